"""What the kernels' CP forward takes from plain PyTorch: the segment table and the truncation test,
checked against the chunk-layout specification in ``context_parallel``."""
import pytest
import torch

from flashdelta.gated_delta_rule import context_parallel as cp
from flashdelta.gated_delta_rule.chunked import ChunkLayout
from flashdelta.gated_delta_rule.naive import l2norm
from flashdelta.gated_delta_rule.planner import plan_forward
from flashdelta.gated_delta_rule.segments import SegmentTable, warmup_spans
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
    tokens = table.tokens.flatten(1)
    for j, (first, length) in enumerate(table.spans[:-1].tolist()):
        assert tokens[j, :length].tolist() == list(range(first, first + length))
        assert (tokens[j, length:] == (len(lens) * lens[0] if batched else sum(lens))).all()
    assert table.is_last.tolist() == [j in table.last.tolist() for j in range(S)]


@pytest.mark.parametrize("l2", [False, True])
def test_warmup_spans_follow_the_specification(l2):
    lens, seg, HV, H = (1500, 900, 64 * 7), 2, 4, 2
    gen = torch.Generator().manual_seed(1)
    q, k, v, g, beta, _ = make_inputs(1, sum(lens), H, HV, 16, 16, generator=gen, zero_gate_heads=1)
    g = g * torch.tensor([1.0, 8.0, 30.0, 0.5])        # per head: never, often, always, rarely below -tau
    if not l2:
        k[..., :300, :, :] *= 2                         # beta |k|^2 may exceed 2 there: no truncation
    plan = plan_forward(lens, HV, 16, 132, context_parallel=seg)
    table = SegmentTable.build(plan, lens, None, CPU)
    spans, keep = warmup_spans(g, beta, k, table, HV // H, l2, cp.TRUNCATION_TAU)
    S = len(plan.segments)
    assert spans.shape == (S + 1, HV, 4) and spans.dtype == torch.int32 and keep.shape == (S + 1, HV)
    assert not spans[-1].any() and not keep[-1].any()

    layout = ChunkLayout.build(lens, None, CPU)
    kk = l2norm(k) if l2 else k
    kc = layout.gather(kk.repeat_interleave(HV // H, dim=2))
    _, _, G, contractive = cp.segment_summaries(kc, layout.gather(v), layout.gather(g), layout.gather(beta), seg)
    want = cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU)      # [N, HV, NS]
    want = torch.cat([want[n, :, :len([1 for m, _, _ in plan.segments if m == n])].t() for n in range(len(lens))])
    used = ~table.is_last
    assert used.sum() == S - len(lens)
    truncated = spans[:-1, :, 3] == 0
    assert torch.equal(truncated[used], want[used]) and want[used].any() and not want[used].all()
    assert torch.equal(keep[:-1][used], (~want[used]).float()) and not keep[:-1][~used].any()
    gf = g.reshape(-1, HV)
    for j in range(S):
        first, length = table.spans[j].tolist()
        for h in range(HV):
            r0, rn, m0, mn = spans[j, h].tolist()
            if not used[j]:
                assert rn == 0 and mn == 0
            elif not want[j, h]:                         # exact: R and M over the whole segment
                assert (r0, rn, m0, mn) == (first, length, first, length)
            else:                                        # the shortest chunk-aligned suffix decaying by tau
                assert r0 + rn == first + length and (r0 - first) % 64 == 0 and mn == 0
                assert gf[r0:r0 + rn, h].sum() <= -cp.TRUNCATION_TAU
                assert rn <= 64 or gf[r0 + 64:r0 + rn, h].sum() > -cp.TRUNCATION_TAU
