"""What the kernels' CP forward takes from plain PyTorch: the segment table and the truncation test,
checked against the chunk-layout specification in ``context_parallel``."""
import pytest
import torch

from flashdelta.gated_delta_rule import context_parallel as cp
from flashdelta.gated_delta_rule.chunked import ChunkLayout
from flashdelta.gated_delta_rule.naive import l2norm
from flashdelta.gated_delta_rule.planner import plan_forward
from flashdelta.gated_delta_rule.segments import SegmentTable, chunk_stats, warmup_spans
from helpers import make_inputs

CPU = torch.device("cpu")


def chunk_table(lens, batched_len=None):
    """The kernels' chunk table: (first token, valid rows) of every chunk, sequences in order."""
    rows, offset = [], 0
    for n, length in enumerate(lens):
        first = n * batched_len if batched_len is not None else offset
        rows += [[first + c, min(64, length - c)] for c in range(0, length, 64)]
        offset += length
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


@pytest.mark.parametrize("lens,batched", [((700, 700), True), ((0, 1500, 5, 64, 700, 1), False)])
def test_segment_table(lens, batched):
    plan = plan_forward(lens, 4, 128, 132, context_parallel=3)
    table = SegmentTable.build(plan, lens, lens[0] if batched else None, CPU)
    S = len(plan.segments)
    assert table.spans.shape == (S + 1, 3) and table.spans[-1].tolist() == [0, 0, -1]
    assert table.segments.shape == (S + 1, 5) and table.segments[-1].tolist() == [0] * 5
    assert torch.equal(table.segments[:, :2], table.spans[:, :2])
    empty = [n for n, length in enumerate(lens) if length == 0]
    assert (table.empty is None) == (not empty) and (not empty or table.empty.tolist() == empty)
    first = [n * lens[0] for n in range(len(lens))] if batched else [sum(lens[:n]) for n in range(len(lens))]
    chunks = chunk_table(lens, lens[0] if batched else None).tolist()
    for n, length in enumerate(lens):
        mine = [i for i in table.order[n].tolist() if i < S]
        assert sum(int(table.spans[i, 1]) for i in mine) == length and bool(mine) == bool(length)
        if mine:
            assert int(table.spans[mine[0], 0]) == first[n]
            assert all(int(table.spans[a, 0] + table.spans[a, 1]) == int(table.spans[b, 0])
                       for a, b in zip(mine, mine[1:]))
        for i in mine:
            assert int(table.spans[i, 2]) == (n if i == mine[-1] else -1)
            start, tokens, c0, count, used = table.segments[i].tolist()
            assert used == int(i != mine[-1]) and count == -(-tokens // 64)
            assert chunks[c0][0] == start and sum(rows for _, rows in chunks[c0:c0 + count]) == tokens


def test_chunk_stats():
    lens, HV, H = (130, 64, 0, 7), 4, 2
    gen = torch.Generator().manual_seed(2)
    _, k, _, g, beta, _ = make_inputs(1, sum(lens), H, HV, 16, 16, generator=gen)
    k[:, :40] *= 3                                   # beta |k|^2 = 9 beta: above 2 for most tokens there
    chunks = chunk_table(lens)
    for l2 in (False, True):
        stats = chunk_stats(g, beta, k, chunks, HV // H, l2)
        for c, (t0, rows) in enumerate(chunks.tolist()):
            kk = k[0, t0:t0 + rows].float().repeat_interleave(HV // H, dim=1).square().sum(-1)
            kk = kk / (kk + 1e-6) if l2 else kk
            bk = beta[0, t0:t0 + rows].float() * kk
            assert torch.allclose(stats[c, :, 0], g[0, t0:t0 + rows].float().sum(0))
            assert torch.equal(stats[c, :, 1], ((bk < 0) | (bk > 2)).float().sum(0))
        assert stats[..., 1].any() != l2


@pytest.mark.parametrize("l2", [False, True])
def test_warmup_spans_follow_the_specification(l2):
    lens, seg, HV, H = (1500, 900, 64 * 7), 2, 4, 2
    gen = torch.Generator().manual_seed(1)
    q, k, v, g, beta, _ = make_inputs(1, sum(lens), H, HV, 16, 16, generator=gen, zero_gate_heads=1)
    g = g * torch.tensor([1.0, 8.0, 30.0, 0.5])        # per head: never, often, always, rarely below -tau
    if not l2:
        k[..., :300, :, :] *= 2                         # beta |k|^2 may exceed 2 there
    plan = plan_forward(lens, HV, 16, 132, context_parallel=seg)
    table = SegmentTable.build(plan, lens, None, CPU)
    stats = chunk_stats(g, beta, k, chunk_table(lens), HV // H, l2)
    spans, keep = warmup_spans(stats, table, cp.TRUNCATION_TAU)
    S = len(plan.segments)
    assert spans.shape == (S + 1, HV, 4) and spans.dtype == torch.int32 and keep.shape == (S + 1, HV)
    assert not spans[-1, :, 1::2].any() and not keep[-1].any()

    layout = ChunkLayout.build(lens, None, CPU)
    kk = l2norm(k) if l2 else k
    kc = layout.gather(kk.repeat_interleave(HV // H, dim=2))
    _, _, G, contractive = cp.segment_summaries(kc, layout.gather(v), layout.gather(g), layout.gather(beta), seg)
    spec = cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU)      # [N, HV, NS]
    spec = torch.cat([spec[n, :, :len([1 for m, _, _ in plan.segments if m == n])].t() for n in range(len(lens))])
    used = table.segments[:-1, 4].bool()
    assert used.sum() == S - len(lens)
    truncated = (spans[:-1, :, 3] == 0) & used[:, None]
    # the spec's truncations (whole segments) are kept; windows also allow a broken token before them
    assert not (spec & used[:, None] & ~truncated).any() and truncated.any() and not truncated[used].all()
    assert torch.equal(keep[:-1], (used[:, None] & ~truncated).float())
    gf = g.reshape(-1, HV)
    bk = beta.reshape(-1, HV) * kk.reshape(-1, H, 16).square().sum(-1).repeat_interleave(HV // H, dim=1)
    for j in range(S):
        first, length, _ = table.spans[j].tolist()
        for h in range(HV):
            r0, rn, m0, mn = spans[j, h].tolist()
            if not used[j]:
                assert rn == 0 and mn == 0
            elif not truncated[j, h]:                    # exact: R and M over the whole segment
                assert (r0, rn, m0, mn) == (first, length, first, length)
            else:                                        # the shortest chunk-aligned suffix decaying by tau
                assert r0 + rn == first + length and (r0 - first) % 64 == 0 and mn == 0
                assert gf[r0:r0 + rn, h].sum() <= -cp.TRUNCATION_TAU
                assert rn <= 64 or gf[r0 + 64:r0 + rn, h].sum() > -cp.TRUNCATION_TAU
                assert ((bk[r0:r0 + rn, h] >= 0) & (bk[r0:r0 + rn, h] <= 2)).all()


@pytest.mark.parametrize("with_r", [False, True])
def test_backward_spans_follow_the_specification(with_r):
    """The CP backward's spans: M dropped exactly where the spec's ``truncation_mask`` drops it (whole
    segments: summed decay reaching -tau and every token contractive), for every segment including a
    sequence's last; R over whole segments, or none where the forward stored its states."""
    from flashdelta.gated_delta_rule.hopper import context_parallel_backward as cpb
    lens, seg, HV, H = (1500, 900, 64 * 7), 2, 4, 2
    gen = torch.Generator().manual_seed(2)
    q, k, v, g, beta, _ = make_inputs(1, sum(lens), H, HV, 16, 16, generator=gen, zero_gate_heads=1)
    g = g * torch.tensor([1.0, 8.0, 30.0, 0.5])
    k[..., :300, :, :] *= 2                             # beta |k|^2 may exceed 2 there
    plan = plan_forward(lens, HV, 16, 132, context_parallel=seg)
    table, _, _ = cpb.backward_tables(plan, lens, None, CPU)
    stats = chunk_stats(g, beta, k, chunk_table(lens), HV // H, False)
    spans, keep = cpb.backward_spans(stats, table, cp.TRUNCATION_TAU, with_r)
    S = len(plan.segments)
    assert spans.shape == (S + 1, HV, 4) and spans.dtype == torch.int32 and not keep[-1].any()

    layout = ChunkLayout.build(lens, None, CPU)
    kc = layout.gather(k.repeat_interleave(HV // H, dim=2))
    _, _, G, contractive = cp.segment_summaries(kc, layout.gather(v), layout.gather(g), layout.gather(beta), seg)
    spec = cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU)      # [N, HV, NS]
    spec = torch.cat([spec[n, :, :len([1 for m, _, _ in plan.segments if m == n])].t() for n in range(len(lens))])
    assert spec.any() and not spec.all()
    assert torch.equal(keep[:-1], (~spec).float())
    first, length = table.spans[:-1, 0, None].expand(S, HV), table.spans[:-1, 1, None].expand(S, HV)
    assert torch.equal(spans[:-1, :, 0], first) and torch.equal(spans[:-1, :, 2], first)
    assert torch.equal(spans[:-1, :, 1], length * int(with_r))
    assert torch.equal(spans[:-1, :, 3], torch.where(spec, 0, length))
    exact, _ = cpb.backward_spans(stats, table, float("inf"), True)
    assert torch.equal(exact[:-1, :, 3], length)                       # tau = inf: nothing dropped
