"""flashdelta inside transformers' GDN models: tiny random models built from configs (no downloads),
run by transformers' own PyTorch fallback and then by flashdelta (``integrations.transformers``)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import flashdelta.integrations.transformers as fd_hf  # noqa: E402
from flashdelta.gated_delta_rule import api  # noqa: E402
from helpers import rel_err  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])
MOE = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", MOE),
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {}),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", MOE),
}


def build(family, seed=0):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls that reach flashdelta's op; transformers' own functions come back afterwards."""
    calls = []
    original = api.chunk_gated_delta_rule

    def spy(*a, **kw):
        calls.append((a[0].shape, api.explain(*a, **kw)))        # the path each call takes
        return original(*a, **kw)
    monkeypatch.setattr(fd_hf, "chunk_gated_delta_rule", spy)
    yield calls
    fd_hf.disable()


def _ids(seed=1, shape=(2, 37)):
    return torch.randint(0, COMMON["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_generate_match_the_fallback(family, inference, counted):
    model, ids = build(family), _ids()
    mode = torch.inference_mode if inference else torch.no_grad
    with mode():
        want = model(ids).logits
        want_tokens = model.generate(ids[:, :9], max_new_tokens=6, do_sample=False)
        assert fd_hf.enable(model) == [type(model.model.layers[0].linear_attn).__module__]
        got = model(ids).logits
        got_tokens = model.generate(ids[:, :9], max_new_tokens=6, do_sample=False)
    assert counted, "flashdelta was not called"
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_training_step_gradients_match(family, counted):
    model, ids = build(family).train(), _ids()

    def grads(m):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad.clone().double() for n, p in m.named_parameters() if p.grad is not None}

    # exact: flashdelta's torch path in float64 (MoE families' grouped matmuls take no float64: dense only)
    exact_model = copy.deepcopy(model).double() if not FAMILIES[family][2] else None
    want = grads(model)
    fd_hf.enable(model)
    got = grads(model)
    exact = grads(exact_model) if exact_model is not None else None
    assert counted and got.keys() == want.keys()
    for name in want:
        if name.endswith(("A_log", "dt_bias")):
            if exact is None:
                continue
            # Reached only through dg, at transformers' random gates (g about -7 to -22 a token): the
            # fallback's float32 cumulative decays leave it 0.1-0.5 off float64; ours are summed in float64.
            ours, theirs = rel_err(got[name], exact[name]), rel_err(want[name], exact[name])
            assert ours <= 1e-3 and ours <= theirs, (name, ours, theirs)
        else:
            assert rel_err(got[name], want[name]) <= 1e-3, name


def test_packed_sequences_equal_separate_runs(counted):
    """What the layers pass for a packed batch (cu_seqlens from cu_seq_lens_q) against one call per sequence
    of transformers' own fallback, which cannot take it packed."""
    module = __import__(fd_hf.enable(build("qwen3_5"))[0], fromlist=["_"])
    fallback = fd_hf._originals[module.__name__][fd_hf.CHUNK_NAME]
    gen = torch.Generator().manual_seed(3)
    lens = [23, 64, 5]
    q, k = (torch.randn(1, sum(lens), 2, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, sum(lens), 4, 16, generator=gen)
    g = -torch.rand(1, sum(lens), 4, generator=gen)
    beta = torch.rand(1, sum(lens), 4, generator=gen)
    cu = torch.tensor([0, 23, 87, 92], dtype=torch.int32)
    with torch.inference_mode():
        o, state = module.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True,
                                                       use_qk_l2norm_in_kernel=True, cu_seqlens=cu,
                                                       max_length_q=64, cu_seq_lens_k=cu)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            part = [x[:, a:b] for x in (q, k, v, g, beta)]
            o_i, s_i = fallback(*part, output_final_state=True, use_qk_l2norm_in_kernel=True)
            assert torch.allclose(o[:, a:b], o_i, atol=1e-5) and torch.allclose(state[i], s_i[0], atol=1e-5)


def test_enable_without_a_model_covers_every_family_and_disable_restores():
    names = fd_hf.gdn_modules()
    assert {f"transformers.models.{f}.modeling_{f}" for f in FAMILIES} <= set(names)
    import importlib
    module = importlib.import_module(names[0])
    before = module.torch_chunk_gated_delta_rule
    assert fd_hf.enable() == names
    assert module.torch_chunk_gated_delta_rule is fd_hf.chunk
    assert module.torch_recurrent_gated_delta_rule is fd_hf.recurrent
    fd_hf.disable()
    assert module.torch_chunk_gated_delta_rule is before


def test_a_model_without_gdn_layers_is_refused():
    with pytest.raises(ValueError, match="no gated-delta layers"):
        fd_hf.enable(torch.nn.Linear(2, 2))



@pytest.mark.gpu
def test_a_model_on_the_kernels(counted):
    """On Hopper, with the kernels' head dims (K = V = 128), bf16: the layers run the TileLang path."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    config = transformers.Qwen3_5TextConfig(**(COMMON | dict(hidden_size=256, linear_key_head_dim=128,
                                                             linear_value_head_dim=128)))
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(config).cuda().bfloat16().eval()
    ids = _ids(shape=(2, 300)).cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
        fd_hf.enable(model)
        got = model(ids).logits.float()
    assert counted and all(route.startswith("tilelang") for _, route in counted)
    assert rel_err(got, want) < 2e-2
