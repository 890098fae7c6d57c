"""Public API: argument validation, FLA keyword compatibility, backend dispatch."""
import subprocess
import sys

import pytest
import torch

import flashdelta
from flashdelta import chunk_gated_delta_rule
from flashdelta.gated_delta_rule import inputs as inputs_mod
from helpers import make_inputs


def args(B=2, T=10, H=2, HV=4, K=8, V=6, dtype=torch.float32, **kw):
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, K, V, dtype=dtype, **kw)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)


def call(**kw):
    a = args()
    a.update(kw)
    return chunk_gated_delta_rule(**a)


@pytest.mark.parametrize("name,value,match", [
    ("q", torch.randn(2, 10, 2), r"`q`: expected a 4-D"),
    ("k", torch.randn(2, 10, 2, 7), r"`k`: expected shape"),
    ("v", torch.randn(2, 11, 4, 6), r"`v`: expected shape \[B=2, T=10"),
    ("v", torch.randn(2, 10, 3, 6), r"`v`: expected a number of value heads HV that is a multiple of H=2"),
    ("g", torch.randn(2, 10, 3), r"`g`: expected shape \[B, T, HV\]"),
    ("beta", torch.randn(2, 10), r"`beta`: expected a 3-D"),
    ("initial_state", torch.randn(2, 4, 6, 8), r"`initial_state`: expected shape \[N, HV, K, V\]"),
    ("initial_state", torch.randn(3, 4, 8, 6), r"`initial_state`: expected shape"),
])
def test_shape_errors(name, value, match):
    with pytest.raises(ValueError, match=match):
        call(**{name: value})


@pytest.mark.parametrize("name", ["q", "k", "v", "g", "beta", "initial_state"])
def test_integer_dtype_rejected(name):
    a = args()
    with pytest.raises(TypeError, match=f"`{name}`: expected dtype"):
        call(**{name: a[name].to(torch.int32)})


def test_non_tensor_rejected():
    with pytest.raises(TypeError, match="`q`: expected a torch.Tensor"):
        call(q=[[1.0]])


def test_mismatched_qk_dtype():
    a = args()
    with pytest.raises(TypeError, match="`k`: expected the dtype of q"):
        call(k=a["k"].double())


def test_meta_device_mix_rejected():
    with pytest.raises(ValueError, match="one device"):
        call(g=torch.zeros(2, 10, 4, device="meta"))


def test_state_v_first_shape():
    a = args()
    with pytest.raises(ValueError, match=r"\[N, HV, V, K\]"):
        call(state_v_first=True)
    o, s = call(state_v_first=True, initial_state=a["initial_state"].transpose(-1, -2), output_final_state=True)
    assert s.shape == (2, 4, 6, 8)


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([[0, 10]]), "`cu_seqlens`: expected a 1-D"),
    (torch.tensor([0.0, 10.0]), "`cu_seqlens`: expected dtype"),
    (torch.tensor([1, 10]), "starting at 0"),
    (torch.tensor([0, 6, 4, 10]), "non-decreasing"),
    (torch.tensor([0, 4, 9]), "last offset equal to T=10"),
    (torch.tensor([0]), "at least 2 offsets"),
])
def test_cu_seqlens_errors(cu, match):
    a = args(B=1, num_seqs=1)
    with pytest.raises((ValueError, TypeError), match=match):
        chunk_gated_delta_rule(**a, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    with pytest.raises(ValueError, match="batch size 1"):
        call(cu_seqlens=torch.tensor([0, 10]))


def test_cu_seqlens_initial_state_count():
    a = args(B=1, num_seqs=1)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule(**a, cu_seqlens=torch.tensor([0, 4, 10]))


def test_cu_seqlens_cpu_is_used_and_int64_accepted():
    a = args(B=1, num_seqs=2)
    cu = torch.tensor([0, 4, 10])
    o1, s1 = chunk_gated_delta_rule(**a, cu_seqlens=cu, output_final_state=True)
    o2, s2 = chunk_gated_delta_rule(**a, cu_seqlens=cu.int(), cu_seqlens_cpu=cu, output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


def test_sequence_lengths_cached_per_tensor():
    cu = torch.tensor([0, 3, 9])
    assert inputs_mod.sequence_lengths(cu) == (3, 6)
    assert id(cu) in inputs_mod._lengths_cache
    cu[2] = 8          # in-place change bumps the version: re-read
    assert inputs_mod.sequence_lengths(cu) == (3, 5)
    key = id(cu)
    del cu
    assert key not in inputs_mod._lengths_cache


def test_fla_keywords(caplog):
    a = args()
    o, _ = chunk_gated_delta_rule(**a, head_first=False, chunk_size=64, chunk_indices=None, cu_seqlens_cpu=None)
    assert o.shape == (2, 10, 4, 6)
    for size in (16, 32):                      # FLA's chunk sizes: the same result up to rounding
        assert torch.allclose(chunk_gated_delta_rule(**a, chunk_size=size)[0], o, atol=1e-5)
    with pytest.raises(ValueError, match="`chunk_size`: expected one of"):
        call(chunk_size=128)
    with pytest.raises(TypeError, match="`cp_context`: expected flashdelta.CPContext"):
        call(cp_context=object())
    with pytest.raises(ValueError, match="head_first"):
        call(head_first=True)
    # what models forward in **kwargs is ignored, with a debug log, as FLA does
    with caplog.at_level("DEBUG", logger="flashdelta"):
        o2, _ = chunk_gated_delta_rule(**a, use_cache=True, output_router_logits=False, cu_seq_lens_k=None,
                                       max_length_q=10)
    assert torch.equal(o, o2)
    assert "ignoring keyword arguments ['cu_seq_lens_k', 'max_length_q', 'output_router_logits', 'use_cache']" \
        in caplog.text


def test_fla_positional_order():
    """q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
    use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens, as FLA orders them."""
    a = args(B=1, T=12)
    cu = torch.tensor([0, 5, 12])
    h0 = torch.randn(2, 4, 8, 6, dtype=torch.float64)
    want = chunk_gated_delta_rule(*list(a.values())[:5], scale=0.3, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                  allow_neg_eigval=True, cu_seqlens=cu)
    got = chunk_gated_delta_rule(*list(a.values())[:5], 0.3, h0, True, True, True, True, False, cu)
    assert all(torch.equal(x, y) for x, y in zip(want, got))


def test_transpose_state_layout_alias():
    a = args()
    o, s = call(transpose_state_layout=True, initial_state=a["initial_state"].transpose(-1, -2),
                output_final_state=True)
    assert s.shape == (2, 4, 6, 8)


def test_backend_choice():
    with pytest.raises(ValueError, match="`backend`"):
        call(backend="cuda")
    with pytest.raises(RuntimeError, match="backend='tilelang' cannot run this call: tensors are on cpu"):
        call(backend="tilelang")
    a = args()
    o_auto, _ = chunk_gated_delta_rule(**a)
    o_torch, _ = chunk_gated_delta_rule(**a, backend="torch")
    assert torch.equal(o_auto, o_torch)


def test_autograd_on_cpu_through_every_input():
    a = {n: x.requires_grad_() for n, x in args(dtype=torch.float64).items()}
    o, s = chunk_gated_delta_rule(**a, output_final_state=True)
    (o.sum() + s.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in a.values())


def test_import_does_not_touch_cuda_or_tilelang():
    code = ("import sys, torch, flashdelta; "
            "assert not torch.cuda.is_initialized(); "
            "assert 'tilelang' not in sys.modules; print(flashdelta.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == flashdelta.__version__


def test_context_parallel_option_on_torch_path():
    a = args(B=1, T=700, H=1, HV=2, K=8, V=8, dtype=torch.float64, num_seqs=1)
    o, s = chunk_gated_delta_rule(**a, output_final_state=True)
    o_cp, s_cp = chunk_gated_delta_rule(**a, output_final_state=True, context_parallel=3)
    assert (o_cp - o).abs().max() < 1e-9 and (s_cp - s).abs().max() < 1e-9
    o_cp, _ = chunk_gated_delta_rule(**a, context_parallel=True)
    assert (o_cp - o).abs().max() < 1e-9
    for bad in (0, -2, "yes", 1.5):
        with pytest.raises(ValueError, match="`context_parallel`"):
            chunk_gated_delta_rule(**a, context_parallel=bad)
    with pytest.raises(ValueError, match="needs K == V"):
        call(context_parallel=True)


def test_explain_names_the_path():
    a = args()
    assert flashdelta.explain(**a).startswith("torch (tensors are on cpu")
    assert flashdelta.explain(**a, backend="torch") == "torch (backend='torch')"
    b = args(B=1, T=700, H=1, HV=2, K=8, V=8, num_seqs=1)
    assert "context parallel: 4 segments of 3 chunks" in flashdelta.explain(**b, backend="torch", context_parallel=3)
    with pytest.raises(ValueError, match="`backend`"):
        flashdelta.explain(**a, backend="gpu")


def test_varlen_under_inference_mode():
    a = args(B=1, T=300, num_seqs=2)
    expected, s_expected = chunk_gated_delta_rule(**a, cu_seqlens=torch.tensor([0, 100, 300]), output_final_state=True)
    with torch.inference_mode():
        cu = torch.tensor([0, 100, 300])
        assert cu.is_inference()
        o, s = chunk_gated_delta_rule(**a, cu_seqlens=cu, output_final_state=True)
        assert torch.equal(o, expected) and torch.equal(s, s_expected)
        cu[1] = 150           # no version counter to see this: inference tensors are read every call
        assert inputs_mod.sequence_lengths(cu) == (150, 150)
        assert id(cu) not in inputs_mod._lengths_cache


def test_lengths_cache_survives_id_reuse():
    cu = torch.tensor([0, 3, 9])
    assert inputs_mod.sequence_lengths(cu) == (3, 6)
    key = id(cu)
    del cu
    for _ in range(1000):     # CPython usually hands the freed object's id to the next allocation
        other = torch.tensor([0, 5, 9])
        if id(other) == key:
            break
    assert inputs_mod.sequence_lengths(other) == (5, 4)


def test_lengths_cache_sees_in_place_change_through_a_view():
    cu = torch.tensor([0, 3, 9])
    assert inputs_mod.sequence_lengths(cu) == (3, 6)
    cu[1:].add_(1)
    assert inputs_mod.sequence_lengths(cu) == (4, 6)
    with torch.inference_mode():          # a normal tensor changed under inference mode still counts
        cu[2] = 12
    assert inputs_mod.sequence_lengths(cu) == (4, 8)
