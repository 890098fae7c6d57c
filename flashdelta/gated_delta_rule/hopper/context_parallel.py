"""Context-parallel forward on Hopper (DESIGN section 3): the plan's segments run as sequences.

Launches, none waiting on the host:

1. ``chunk_matrices`` once for all chunks (segments start on chunk boundaries, so the per-chunk
   operators are shared by both passes), with each chunk's decay and norm-condition statistics;
2. ``segment_windows``: the truncation test and warm-up spans per (segment, head), from per-chunk
   statistics (reference: ``segments.warmup_spans``);
3. ``chunk_recurrence`` in its state-only warm-up variant: R over each segment (or only its window,
   where truncated) and M where it is needed, in one launch;
4. ``segment_scan``: the state entering every segment;
5. ``chunk_recurrence`` over the segments from those states: o, and each segment's final state.
"""
import functools

import torch

from ..context_parallel import TRUNCATION_TAU
from ..segments import SegmentTable
from .forward import (CHUNK, DTYPES, _compile, _tables, entry, flat, on_device, prepare, ready, recur, sizes,
                      warmup)
from .segment_scan import segment_scan_kernel
from .segment_windows import segment_windows_kernel

SCAN_V_TILE = 32


@functools.lru_cache(maxsize=None)
def scan_kernel(K: int = 128):
    return _compile(segment_scan_kernel, K, SCAN_V_TILE)


@functools.lru_cache(maxsize=None)
def windows_kernel():
    return _compile(segment_windows_kernel, CHUNK)


def segment_windows(stats, table: SegmentTable, tau: float):
    """``segments.warmup_spans`` on the device, in one launch: (spans [S + 1, HV, 4], keep [S + 1, HV])."""
    rows, HV = table.segments.shape[0], stats.shape[1]
    spans = torch.empty(rows, HV, 4, dtype=torch.int32, device=stats.device)
    keep = torch.empty(rows, HV, dtype=torch.float32, device=stats.device)
    entry(windows_kernel())(stats, table.segments, spans, keep, float(tau))
    return spans, keep


@functools.lru_cache(maxsize=64)
def _state_spans(plan, seq_lens: tuple[int, ...], stride: int | None, device: torch.device):
    """The output pass's segment rows with each segment's first chunk appended (``forward._state_rows``)."""
    table = SegmentTable.build(plan, seq_lens, stride, device)
    return torch.cat([table.spans, table.segments[:, 2:3]], 1).contiguous()


def hopper_cp_forward(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                      use_qk_l2norm_in_kernel: bool, cu_seqlens, seq_lens, state_v_first: bool, plan,
                      tau: float = TRUNCATION_TAU, save_states: bool = False):
    """``save_states``: as ``forward.hopper_forward``'s (the output pass stores the states it enters
    every chunk with, those the forward's output used): returns (o, final state, states)."""
    B, Tn, H, K, HV, V, seq_lens, N, tokens, stride, dev = sizes(q, v, seq_lens, cu_seqlens)
    assert K == V and q.dtype in DTYPES
    ready(DTYPES[q.dtype])
    table = SegmentTable.build(plan, seq_lens, stride, dev)
    S = table.spans.shape[0] - 1
    _, chunks = _tables(seq_lens, stride, dev)
    qf, kf, vf = (flat(x, tokens, x.shape[2], x.shape[3]) for x in (q, k, v))
    o = torch.empty(B, Tn, HV, V, dtype=q.dtype, device=dev)
    of = o.view(tokens, HV, V)
    h0 = torch.zeros(N, HV, K, V, dtype=torch.float32, device=dev) if initial_state is None else \
        flat(initial_state.transpose(-1, -2) if state_v_first else initial_state, N, HV, K, V, dtype=torch.float32)

    with on_device(dev):
        ag, coef, stats = prepare(qf, kf, g, beta, chunks, HV, scale, use_qk_l2norm_in_kernel)
        spans, keep = segment_windows(stats, table, tau)
        ends = torch.empty(2 * (S + 1), HV, K * V, dtype=torch.float32, device=dev)
        warmup(qf, kf, vf, ag, coef, spans, ends, plan.v_tile)
        starts = torch.empty(S + 1, HV, K, V, dtype=torch.float32, device=dev)
        entry(scan_kernel(K))(ends[S + 1:].view(S + 1, HV, K, K), ends[:S + 1].view(S + 1, HV, K, V), keep, h0,
                              table.order, starts)
        # each sequence's final state is its last segment's, written in place by the output pass
        final = torch.empty(N, HV, K, V, dtype=torch.float32, device=dev) if output_final_state else None
        states = torch.empty(chunks.shape[0], HV, V, K, dtype=q.dtype, device=dev) if save_states else None
        recur(qf, kf, vf, ag, coef, _state_spans(plan, seq_lens, stride, dev) if save_states else table.spans,
              starts.view(S + 1, HV, K * V), of, None if final is None else final.view(N, HV, K * V), False,
              plan.v_tile, states)

    if final is not None:
        if table.empty is not None:              # sequences with no tokens keep their h0
            final[table.empty] = h0[table.empty]
        final = final.transpose(-1, -2).contiguous() if state_v_first else final
    return (o, final, states) if save_states else (o, final)
