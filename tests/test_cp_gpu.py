"""Context parallelism on the Hopper kernels, through the public API, against float64 references."""
import pytest
import torch
import torch.nn.functional as F

from flashdelta import chunk_gated_delta_rule, naive_gated_delta_rule
from helpers import make_inputs, rel_err

pytestmark = pytest.mark.gpu
TOL = 5e-3
DEV = "cuda"


def mixed_gates(g):
    """Per value head: g = 0, tiny decay, the drawn decay, strong decay (repeating)."""
    g = g.clone()
    g[..., 0::4] = 0
    g[..., 1::4] = -1e-4 * torch.rand_like(g[..., 1::4])
    g[..., 3::4] = -5 * torch.rand_like(g[..., 3::4])
    return g


def check(lens, H, HV, *, varlen, context_parallel, h0=True, v_first=False, l2=False, seed=0, reference="naive"):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    gen = torch.Generator().manual_seed(seed)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    q, k, v, g, beta, s0 = make_inputs(B, T, H, HV, 128, 128, h0=h0, num_seqs=len(lens), generator=gen)
    q = F.normalize(q, dim=-1)
    g = mixed_gates(g)
    if v_first and s0 is not None:
        s0 = s0.transpose(-1, -2).contiguous()
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32) if varlen else None
    dev = [x.to(DEV, torch.bfloat16) for x in (q, k, v)] + [x.to(DEV, torch.float32) for x in (g, beta)]
    ds0 = s0.to(DEV, torch.float32) if s0 is not None else None
    dcu = cu.to(DEV) if cu is not None else None
    torch.full((B, T, HV, 128), float("nan"), device=DEV, dtype=torch.bfloat16)   # poison the allocator's blocks
    o, ht = chunk_gated_delta_rule(*dev, initial_state=ds0, output_final_state=True, use_qk_l2norm_in_kernel=l2,
                                   cu_seqlens=dcu, state_v_first=v_first, backend="tilelang",
                                   context_parallel=context_parallel)
    torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    args = [x.double() for x in dev]
    ref = naive_gated_delta_rule if reference == "naive" else \
        (lambda *a, **kw: chunk_gated_delta_rule(*a, **kw, backend="torch", context_parallel=False))
    eo, eht = ref(*args, initial_state=ds0.double() if ds0 is not None else None, output_final_state=True,
                  use_qk_l2norm_in_kernel=l2, cu_seqlens=dcu, state_v_first=v_first)
    assert rel_err(o, eo) <= TOL, rel_err(o, eo)
    assert rel_err(ht, eht) <= TOL, rel_err(ht, eht)


@pytest.mark.parametrize("h0", [True, False])
@pytest.mark.parametrize("segment_chunks", [1, 3])
def test_forced_segments_batched(h0, segment_chunks):
    check([700, 700], 2, 8, varlen=False, context_parallel=segment_chunks, h0=h0)


@pytest.mark.parametrize("v_first", [False, True])
def test_forced_segments_varlen_long_and_short(v_first):
    check([1500, 0, 5, 64, 700, 1], 1, 4, varlen=True, context_parallel=4, v_first=v_first, seed=1)


def test_l2norm_truncation_path():
    check([2000, 300], 2, 4, varlen=True, context_parallel=2, l2=True, seed=2)


def test_planned_segments_one_long_sequence():
    check([131072], 1, 4, varlen=False, context_parallel=True, seed=3, reference="torch")


def test_warmup_plan_kernels_match_their_references():
    """``chunk_matrices``' per-chunk statistics and ``segment_windows``' spans against the PyTorch
    references, exactly: g is drawn on a 2^-10 grid with |g| <= 1, so every sum of it is exact in any
    order."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    from flashdelta.gated_delta_rule.context_parallel import TRUNCATION_TAU
    from flashdelta.gated_delta_rule.hopper.context_parallel import segment_windows
    from flashdelta.gated_delta_rule.hopper.forward import _tables, prepare
    from flashdelta.gated_delta_rule.planner import plan_forward
    from flashdelta.gated_delta_rule.segments import SegmentTable, chunk_stats, warmup_spans

    lens, H, HV = (3000, 129, 0, 4100, 64), 2, 8
    gen = torch.Generator().manual_seed(4)
    q, k, _, g, beta, _ = make_inputs(1, sum(lens), H, HV, 128, 128, h0=False, generator=gen)
    g = (mixed_gates(g).clamp(min=-1) * 1024).round() / 1024
    k[:, 500:700] *= 3                                  # beta |k|^2 = 9 beta: above 2 for most of these
    q, k, g, beta = q.to(DEV, torch.bfloat16), k.to(DEV, torch.bfloat16), g.to(DEV).float(), beta.to(DEV).float()
    tokens = sum(lens)
    _, chunks = _tables(lens, None, torch.device(DEV))
    table = SegmentTable.build(plan_forward(lens, HV, 128, 132, context_parallel=4), lens, None, torch.device(DEV))
    for l2 in (False, True):
        *_, stats = prepare(q.view(tokens, H, 128), k.view(tokens, H, 128), g.view(tokens, HV),
                            beta.view(tokens, HV), chunks, HV, 128 ** -0.5, l2)
        assert torch.equal(stats, chunk_stats(g, beta, k, chunks, HV // H, l2))
        assert bool(stats[..., 1].any()) != l2
        spans, keep = segment_windows(stats, table, TRUNCATION_TAU)
        want_spans, want_keep = warmup_spans(stats, table, TRUNCATION_TAU)
        assert torch.equal(spans, want_spans) and torch.equal(keep, want_keep)
        truncated = (want_spans[:-1, :, 3] == 0) & table.segments[:-1, 4:5].bool()
        assert truncated.any() and not truncated.all()
