"""What the kernels' CP forward takes from plain PyTorch: the segment table and the truncation test,
checked against the chunk-layout specification in ``context_parallel``."""
import pytest
import torch

from flashdelta.gated_delta_rule import context_parallel as cp
from flashdelta.gated_delta_rule.chunked import ChunkLayout
from flashdelta.gated_delta_rule.naive import l2norm
from flashdelta.gated_delta_rule.planner import plan_forward
from flashdelta.gated_delta_rule.segments import SegmentTable, truncatable
from helpers import make_inputs

CPU = torch.device("cpu")


@pytest.mark.parametrize("lens,batched", [((700, 700), True), ((0, 1500, 5, 64, 700, 1), False)])
def test_segment_table(lens, batched):
    plan = plan_forward(lens, 4, 128, 132, context_parallel=3)
    table = SegmentTable.build(plan, lens, lens[0] if batched else None, CPU)
    S = len(plan.segments)
    assert table.spans.shape == (S + 1, 2) and table.spans[-1].tolist() == [0, 0]
    first = [n * lens[0] for n in range(len(lens))] if batched else [sum(lens[:n]) for n in range(len(lens))]
    for n, length in enumerate(lens):
        mine = [i for i in table.order[n].tolist() if i < S]
        assert sum(int(table.spans[i, 1]) for i in mine) == length and bool(mine) == bool(length)
        if mine:
            assert int(table.spans[mine[0], 0]) == first[n] and int(table.last[n]) == mine[-1]
            assert all(int(table.spans[a, 0] + table.spans[a, 1]) == int(table.spans[b, 0])
                       for a, b in zip(mine, mine[1:]))
        else:
            assert int(table.last[n]) == S
    assert torch.equal(table.ends - table.starts, table.spans[:-1, 1].long())


@pytest.mark.parametrize("l2", [False, True])
def test_truncation_decision_matches_the_specification(l2):
    lens, seg, HV, H = (1500, 900, 64 * 7), 2, 4, 2
    gen = torch.Generator().manual_seed(1)
    q, k, v, g, beta, _ = make_inputs(1, sum(lens), H, HV, 16, 16, generator=gen, zero_gate_heads=1)
    g = g * torch.tensor([1.0, 8.0, 30.0, 0.5])        # per head: never, often, always, rarely below -tau
    if not l2:
        k[..., :300, :, :] *= 2                         # beta |k|^2 may exceed 2 there: no truncation
    plan = plan_forward(lens, HV, 16, 132, context_parallel=seg)
    table = SegmentTable.build(plan, lens, None, CPU)
    got = truncatable(g, beta, k, table, HV // H, l2, cp.TRUNCATION_TAU)

    layout = ChunkLayout.build(lens, None, CPU)
    kk = l2norm(k) if l2 else k
    kc = layout.gather(kk.repeat_interleave(HV // H, dim=2))
    _, _, G, contractive = cp.segment_summaries(kc, layout.gather(v), layout.gather(g), layout.gather(beta), seg)
    want = cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU)      # [N, HV, NS]
    want = torch.cat([want[n, :, :len([1 for m, _, _ in plan.segments if m == n])].t() for n in range(len(lens))])
    assert got.shape == want.shape and torch.equal(got, want)
    assert got.any() and not got.all() and not got[:, 0].any()
