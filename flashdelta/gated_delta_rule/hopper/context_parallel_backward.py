"""Context-parallel backward on Hopper (issue 16; DESIGN section 7): the two serial walks split into segments.

The unsplit backward (``backward.py``) walks every sequence twice from end to end: the state recompute
(forward) and the state-gradient walk (reverse). Both are affine across segments, S' = M S + R forward
and dS = M^T dS' + G backward, so both split on the forward's plan, with its kernels as they are:

1. ``chunk_matrices`` with Γ⊙A0 and the per-chunk statistics (as the unsplit backward);
2. ``backward_spans`` over every segment (a sequence's last one too: the backward scan applies its
   M), then the warm-up: M per segment and head where it is not truncated, and R where the states
   are recomputed;
3. where the forward did not store its states: ``segment_scan`` forward from h0, the state entering
   every segment; then the state recompute (``chunk_recurrence[save_states]``) over the segments from
   those states, all at once;
4. ``state_gradient`` over the segments from a zero end gradient: the local terms G (its dh0 output;
   its dv and per-chunk gradients are overwritten in step 6);
5. ``segment_scan`` backwards -- the segments in reverse order, M^T for M, G for R, dht for h0: the
   state gradient at the end of every segment (the same kernel, its tables transposed and reversed);
6. ``state_gradient`` over the segments from those end gradients: dv, every chunk's dS' and, on each
   sequence's first segment, dh0;
7. ``chunk_gradients`` as in the unsplit backward.

Truncation is the PyTorch specification's (``context_parallel.segmented_state_gradient_walk`` and
``truncation_mask``): a segment's M (M^T backwards) is dropped where its summed decay reaches -tau and
0 <= beta |k|^2 <= 2 holds on every token of the segment, so ||M|| <= e^-tau bounds what is dropped in
either direction. This is not the forward's window rule: there the window's transition is bounded
and R restarts inside the segment, while here the whole segment's transition is dropped, so the norm
condition must hold before the window too. R is never windowed: where it is needed (the recompute)
it spans the segment. g = 0 heads never truncate. ``tau`` = inf is exact.
"""
import functools

import torch

from ..context_parallel import TRUNCATION_TAU
from ..inputs import host_table
from ..segments import SegmentTable
from .backward import chunk_gradients, finish_gradients, walk_kernel
from .context_parallel import scan_kernel
from .forward import (CHUNK, DTYPES, _tables, entry, flat, on_device, prepare, ready, recurrence_kernel, sizes,
                      unused_rows, warmup)


def backward_spans(stats, table: SegmentTable, tau: float, with_r: bool):
    """The warm-up's spans [rows, HV, 4] (R first token, R length, M first token, M length) and the
    scans' ``keep`` [rows, HV] for the backward, from the per-chunk statistics (decay, broken tokens)
    summed over each segment's chunks (float64 prefix sums: exact enough at any length); ``with_r``:
    R over every used segment, else none. No host sync: a few torch ops on the device."""
    first, length, c0, count, used = table.segments.long().unbind(1)
    sums = torch.cat([stats.new_zeros(1, *stats.shape[1:], dtype=torch.float64), stats.double().cumsum(0)])
    total = sums[c0 + count] - sums[c0]                                   # [rows, HV, 2]
    truncate = (total[..., 0] <= -tau) & (total[..., 1] == 0)
    walked = (length * used)[:, None].expand_as(truncate)
    spans = torch.stack([first[:, None].expand_as(truncate), walked * int(with_r),
                         first[:, None].expand_as(truncate), torch.where(truncate, 0, walked)], -1)
    return spans.to(torch.int32).contiguous(), (~truncate & (used[:, None] > 0)).float()


@functools.lru_cache(maxsize=64)
def backward_tables(plan, seq_lens: tuple[int, ...], batched_len, device: torch.device):
    """The forward's segment table, and what the backward adds to it, from the plan on the host: the
    segment rows with every real segment used (the backward scan reads a sequence's last segment too),
    each sequence's segments in reverse order (padded with the "none" row S), and each sequence's first
    segment (-1 for an empty sequence)."""
    table = SegmentTable.build(plan, seq_lens, batched_len, device)
    S = len(plan.segments)
    per_seq = [[] for _ in seq_lens]
    for i, (n, _, _) in enumerate(plan.segments):
        per_seq[n].append(i)
    width = max((len(p) for p in per_seq), default=0)
    reverse = [p[::-1] + [S] * (width - len(p)) for p in per_seq]
    segments = table.segments.clone()
    segments[:-1, 4] = 1
    return (SegmentTable(table.order, table.spans, segments, table.empty),
            host_table(reverse, torch.int32, device).reshape(len(seq_lens), width),
            host_table([p[0] if p else -1 for p in per_seq], torch.long, device))


def hopper_cp_backward(q, k, v, g, beta, scale: float, initial_state, use_qk_l2norm_in_kernel: bool, cu_seqlens,
                       seq_lens, state_v_first: bool, do, dht, plan, needs_dh0: bool = True, walk_tile: int = 64,
                       tau: float = TRUNCATION_TAU, states=None):
    """``backward.hopper_backward`` on the plan's segments: the same gradients (dq, dk, dv, dg, dbeta,
    dh0), up to rounding and the truncation's e^-tau (module docstring; tau = inf: exact).
    Per-(segment, head) states travel K-major, fp32. ``states``: as ``hopper_backward``'s (given, the
    forward scan and the state recompute of step 3 are skipped)."""
    B, Tn, H, K, HV, V, seq_lens, N, tokens, stride, dev = sizes(q, v, seq_lens, cu_seqlens)
    assert K == V and q.dtype in DTYPES
    ready(DTYPES[q.dtype])
    table, reverse, first = backward_tables(plan, seq_lens, stride, dev)
    rows = table.segments.shape[0]                             # S segments and the "none" row
    _, chunks = _tables(seq_lens, stride, dev)
    qf, kf, vf, dof = (flat(x, tokens, x.shape[2], x.shape[3]) for x in (q, k, v, do))

    def k_major(x):
        return torch.zeros(N, HV, K, V, dtype=torch.float32, device=dev) if x is None else \
            flat(x.transpose(-1, -2) if state_v_first else x, N, HV, K, V, dtype=torch.float32)
    h0, dht_k = k_major(initial_state), k_major(dht)
    seq_rows = table.segments[:, :3].contiguous()              # (first token, length, first chunk) per segment
    a0g = torch.empty(tokens, HV, CHUNK, dtype=q.dtype, device=dev)
    dstates = torch.empty(chunks.shape[0], HV, V, K, dtype=q.dtype, device=dev)
    dv = torch.empty(tokens, HV, V, dtype=q.dtype, device=dev)
    none = unused_rows(HV, K * V, torch.float32, dev)
    scan = entry(scan_kernel(K))
    walk = entry(walk_kernel(DTYPES[q.dtype], walk_tile))
    with on_device(dev):
        ag, coef, stats = prepare(qf, kf, g, beta, chunks, HV, scale, use_qk_l2norm_in_kernel, a0g=a0g)
        spans, keep = backward_spans(stats, table, tau, with_r=states is None)
        ends = torch.empty(2 * rows, HV, K * V, dtype=torch.float32, device=dev)
        warmup(qf, kf, vf, ag, coef, spans, ends, plan.v_tile)
        M = ends[rows:].view(rows, HV, K, K)
        if states is None:
            starts = torch.empty(rows, HV, K, V, dtype=torch.float32, device=dev)
            scan(M, ends[:rows].view(rows, HV, K, V), keep, h0, table.order, starts)
            states = torch.empty_like(dstates)
            entry(recurrence_kernel(DTYPES[q.dtype], 128, save_states=True))(
                qf, kf, vf, ag, coef, seq_rows, starts.view(rows, HV, K * V), vf, none, states, 1, 0, 0)
        local = torch.empty(rows, HV, K * V, dtype=torch.float32, device=dev)
        walk(qf, kf, dof, ag, coef, seq_rows, none, dv, local, dstates, 0, 1, 0)
        end_grads = torch.empty(rows, HV, K, V, dtype=torch.float32, device=dev)
        scan(M.transpose(-1, -2).contiguous(), local.view(rows, HV, K, V), keep, dht_k, reverse, end_grads)
        at_start = torch.empty(rows, HV, K * V, dtype=torch.float32, device=dev)
        walk(qf, kf, dof, ag, coef, seq_rows, end_grads.view(rows, HV, K * V), dv, at_start, dstates, 1, 1, 0)
        dq, dk, dbeta, dg = chunk_gradients(qf, kf, vf, dof, dv, a0g, coef, chunks, states, dstates, scale,
                                             use_qk_l2norm_in_kernel)

    dh0 = None
    if initial_state is not None and needs_dh0:
        dh0 = at_start.view(rows, HV, K, V)[first.clamp(min=0)]
        dh0 = torch.where((first >= 0)[:, None, None, None], dh0, dht_k)      # empty sequences: dht itself
        dh0 = (dh0.transpose(-1, -2) if state_v_first else dh0).contiguous().to(initial_state.dtype)
    return finish_gradients(q, k, g, beta, dq, dk, dv, dg, dbeta, dh0)
