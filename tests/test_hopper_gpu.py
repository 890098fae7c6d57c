"""Hopper kernels against the float64 token loop (needs a CUDA Hopper GPU; skipped elsewhere)."""
import pytest
import torch

from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule

from helpers import make_inputs, rel_err

pytestmark = pytest.mark.gpu

TOL = 5e-3          # rel-RMS for o and the final state with bf16 inputs (FLA's forward tolerance)
DEV = "cuda"


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    from flashdelta.gated_delta_rule.hopper import forward
    return forward


def _poison(*shapes_dtypes):
    """Fill the caching allocator's next blocks with NaN so unwritten outputs show up."""
    held = [torch.full(s, float("nan"), dtype=d, device=DEV) for s, d in shapes_dtypes]
    del held


def _run(lens, H, HV, *, varlen, h0=True, v_first=False, l2=False, zero_heads=0, strong=False,
         dtype=torch.bfloat16, v_tile=128, seed=0, reference="naive", key_scale=1.0):
    hop = _hopper()
    gen = torch.Generator().manual_seed(seed)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    q, k, v, g, beta, s0 = make_inputs(B, T, H, HV, 128, 128, dtype=torch.float64, h0=h0, num_seqs=len(lens),
                                       zero_gate_heads=zero_heads, strong_decay=strong, generator=gen)
    if not l2:
        q = torch.nn.functional.normalize(q, dim=-1)
    else:                       # in-kernel normalisation: feed unnormalised keys
        k = k * (1 + 3 * torch.rand(k.shape[:-1], generator=gen, dtype=torch.float64))[..., None]
    k, beta = k * key_scale, beta / key_scale ** 2            # beta |k|^2 unchanged
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32) if varlen else None
    if s0 is not None and v_first:
        s0 = s0.transpose(-1, -2).contiguous()
    dq, dk, dv = (x.to(DEV, dtype) for x in (q, k, v))
    dg, db = g.to(DEV, torch.float32), beta.to(DEV, torch.float32)
    ds0 = s0.to(DEV, torch.float32) if s0 is not None else None
    dcu = cu.to(DEV) if cu is not None else None
    N = len(lens)
    _poison(((B, T, HV, 128), dtype), ((N, HV, 128, 128), torch.float32), ((B * T, HV, 64), dtype),
            ((B * T, HV, 64), dtype), ((B * T, HV, 4), torch.float32))
    o, ht = hop.hopper_forward(dq, dk, dv, dg, db, 128 ** -0.5, ds0, True, l2, dcu,
                               tuple(lens) if varlen else None, v_first, v_tile=v_tile)
    torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(ht).all(), "unwritten or non-finite outputs"
    args = [x.double() for x in (dq, dk, dv, dg, db)]
    ref_s0 = ds0.double() if ds0 is not None else None
    if reference == "naive":
        eo, eht = naive_gated_delta_rule(*args, scale=128 ** -0.5, initial_state=ref_s0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=l2, cu_seqlens=dcu, state_v_first=v_first)
    else:       # exact chunked torch path in float64: fast enough for very long sequences
        from flashdelta.gated_delta_rule.api import chunk_gated_delta_rule
        eo, eht = chunk_gated_delta_rule(*args, scale=128 ** -0.5, initial_state=ref_s0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=l2, cu_seqlens=dcu, state_v_first=v_first,
                                         backend="torch", context_parallel=False)
    assert rel_err(o, eo) <= TOL
    assert rel_err(ht, eht) <= TOL
    return hop


@pytest.mark.parametrize("H,HV", [(2, 2), (2, 4), (1, 4)])
@pytest.mark.parametrize("h0", [True, False])
def test_batched_gva(H, HV, h0):
    _run([150, 150], H, HV, varlen=False, h0=h0, zero_heads=1)


@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("v_tile", [128, 64])
def test_varlen_tails_and_empty_segments(v_first, v_tile):
    _run([0, 100, 64, 1, 0, 217, 129], 2, 4, varlen=True, v_first=v_first, v_tile=v_tile, seed=1)


def test_large_keys_without_l2norm():
    """Prep's merge GEMMs take fp16 operands: keys of norm 100 (|k|^2 = 1e4, inside fp16's range)."""
    _run([300, 300], 2, 4, varlen=False, key_scale=100.0, seed=5)


def test_l2norm_in_kernel():
    _run([200, 37], 2, 8, varlen=True, l2=True, seed=2)


def test_strong_decay_and_zero_gate_heads():
    _run([300], 1, 4, varlen=False, strong=True, zero_heads=2, seed=3)


def test_single_token():
    _run([1], 2, 2, varlen=False, seed=4)
    _run([1, 0, 1], 1, 2, varlen=True, seed=5)


def test_fp16():
    _run([190, 5], 2, 4, varlen=True, dtype=torch.float16, seed=6)


def test_long_sequence():
    _run([131072], 1, 2, varlen=False, zero_heads=1, seed=7, reference="torch")


def test_new_lengths_do_not_recompile():
    hop = _run([70], 2, 4, varlen=False, seed=8)          # builds (or loads) the kernels
    before = hop.compilations
    _run([333, 5], 2, 4, varlen=False, seed=9)
    _run([12, 0, 300, 64], 2, 4, varlen=True, seed=10)
    _run([129], 4, 8, varlen=True, seed=11)               # new head counts too
    assert hop.compilations == before


def test_more_sequences_than_one_launch(monkeypatch):
    hop = _hopper()
    monkeypatch.setattr(hop, "MAX_GRID_Z", 2)                # 5 sequences -> three launches
    _run([70, 0, 129, 64, 3], 2, 4, varlen=True, seed=12)


@pytest.mark.parametrize("l2norm", [False, True])
def test_prep_split_over_ctas_changes_nothing(l2norm):
    """Every split of a GVA group over the preparation's CTAs writes bitwise the same Ag, factors and
    statistics (a partial last chunk included)."""
    hop = _hopper()
    gen = torch.Generator(device="cuda").manual_seed(13)
    tokens, H, HV = 300, 2, 12
    # unit-norm keys: beta |k|^2 <= 1, so the inverse stays finite without the in-kernel l2-norm too
    q, k = (torch.nn.functional.normalize(torch.randn(tokens, H, 128, device="cuda", generator=gen), dim=-1)
            .bfloat16() for _ in range(2))
    g = torch.nn.functional.logsigmoid(torch.randn(tokens, HV, device="cuda", generator=gen)) / 16
    beta = torch.rand(tokens, HV, device="cuda", generator=gen)
    _, chunks = hop._tables((tokens,), None, q.device)
    outs = [hop.prepare(q, k, g, beta, chunks, HV, 128 ** -0.5, l2norm, per) for per in (6, 3, 2, 1)]
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))
