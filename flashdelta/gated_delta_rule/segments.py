"""Segments of a context-parallel plan as token ranges on the device, and the warm-up plan.

The kernels' CP forward (``hopper/context_parallel.py``) runs a plan's segments as independent
sequences of the packed token axis. This module holds the segment table (built once per plan, on
the host, tested on the CPU against the plan) and, as plain PyTorch, the references of what two
kernels compute for the warm-up: the per-chunk statistics ``chunk_matrices`` writes and the
per-(segment, head) spans ``segment_windows`` derives from them.

Warm-up windows. Where the decay of a suffix of segment j's chunks reaches -tau and every token of
that suffix keeps 0 <= beta |k|^2 <= 2, the state leaving segment j is taken as the state reached
from zero over the shortest such suffix (the window): what is dropped is the window's transition
applied to the true state at the window's start, at most e^-tau of that state's norm -- the bound of
``context_parallel``, with the window in place of the segment. With g = -0.05 per token a window is
~4 chunks, so the warm-up of a decaying head costs a few chunk steps, whatever the segment length.
Elsewhere R and M cover the whole segment (g = 0 heads: exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .inputs import host_table, sequence_starts
from .planner import CHUNK, Plan


@dataclass(frozen=True)
class SegmentTable:
    """Device-side bookkeeping of a plan's segments (built once per plan and device). S segments."""

    order: torch.Tensor           # [N, J] int32 segment index of the j-th segment of sequence n; S = "none"
    spans: torch.Tensor           # [S + 1, 3] int32 (first token, length, final-state row): the row is the
                                  # sequence's on its last segment, -1 elsewhere; the last row is "none"
    segments: torch.Tensor        # [S + 1, 5] int32 first token, length, first chunk, chunks, used (0 for
                                  # a sequence's last segment, whose R and M the scan never reads, and "none")
    empty: torch.Tensor | None    # [E] int64 sequences with no tokens (their final state is h0), or None

    @staticmethod
    @lru_cache(maxsize=64)
    def build(plan: Plan, seq_lens: tuple[int, ...], batched_len: int | None, device: torch.device):
        offsets = sequence_starts(seq_lens, batched_len)
        chunk_offsets = sequence_starts(tuple(-(-length // CHUNK) for length in seq_lens), None)
        S = len(plan.segments)
        per_seq = [[] for _ in seq_lens]
        for i, (n, _, _) in enumerate(plan.segments):
            per_seq[n].append(i)
        J = max((len(p) for p in per_seq), default=0)
        order = [p + [S] * (J - len(p)) for p in per_seq]
        last = [p[-1] if p else S for p in per_seq]
        rows = [[offsets[n] + s, t, chunk_offsets[n] + s // CHUNK, -(-t // CHUNK), int(i != last[n])]
                for i, (n, s, t) in enumerate(plan.segments)] + [[0, 0, 0, 0, 0]]
        final_row = {i: n for n, i in enumerate(last) if i < S}
        spans = [[r[0], r[1], final_row.get(i, -1)] for i, r in enumerate(rows)]
        empty = [n for n, i in enumerate(last) if i == S]
        return SegmentTable(host_table(order, torch.int32, device).reshape(len(seq_lens), J),
                            host_table(spans, torch.int32, device).reshape(-1, 3),
                            host_table(rows, torch.int32, device),
                            host_table(empty, torch.int64, device) if empty else None)


def chunk_stats(g, beta, k, chunks, group: int, use_qk_l2norm: bool):
    """Reference of ``chunk_matrices``' statistics: [num_chunks, HV, 2] float32 -- per chunk of the
    chunk table (first token, valid rows) and value head, the summed g and the number of tokens
    with beta |k|^2 outside [0, 2] (|k| after the in-kernel l2-norm when enabled)."""
    HV = g.shape[-1]
    k2 = k.reshape(-1, k.shape[-2], k.shape[-1]).float().square().sum(-1)        # [T, H]
    if use_qk_l2norm:
        k2 = k2 / (k2 + 1e-6)
    bk = beta.reshape(-1, HV).float() * k2.repeat_interleave(group, dim=1)
    per_token = torch.stack([g.reshape(-1, HV).float(), ((bk < 0) | (bk > 2)).float()], dim=-1)
    per_token = torch.cat([per_token, per_token.new_zeros(1, HV, 2)])            # row T: padding
    offset = torch.arange(CHUNK, device=chunks.device)
    tokens = torch.where(offset < chunks[:, 1:2], chunks[:, :1] + offset, per_token.shape[0] - 1)
    return per_token[tokens.long()].sum(1)


def warmup_spans(stats, table: SegmentTable, tau: float):
    """Reference of ``segment_windows``: per (segment, value head) ``spans`` [S + 1, HV, 4] int32 --
    (R first token, R length, M first token, M length) -- and ``keep`` [S + 1, HV] float32, 1 where
    the scan applies M."""
    first, length, c0, count, used = (x.long() for x in table.segments.unbind(1))
    HV = stats.shape[1]
    steps = torch.arange(int(count.max()) if count.numel() else 0, device=stats.device)
    backwards = c0[:, None] + count[:, None] - 1 - steps                           # [S + 1, L]
    inside = steps < (count * used)[:, None]
    padded = torch.cat([stats, stats.new_zeros(1, HV, 2)])
    walked = padded[torch.where(inside, backwards, stats.shape[0])].cumsum(1)      # [S + 1, L, HV, 2]
    reached = walked[..., 0] <= -tau                                               # a suffix of the walk
    window = torch.where(reached.any(1), reached.shape[1] - reached.sum(1) + 1, 0)
    at_window = walked[..., 1].gather(1, (window - 1).clamp(min=0)[:, None, :]).squeeze(1)
    truncate = (window > 0) & (at_window == 0)
    skip = torch.where(truncate, (count[:, None] - window) * CHUNK, 0)
    first, length, used = first[:, None], length[:, None], used[:, None]
    spans = torch.stack([(first + skip).expand_as(skip), (length - skip) * used, first.expand_as(skip),
                         torch.where(truncate, 0, length * used)], dim=-1)
    keep = torch.where(truncate, 0, used).float()
    return spans.int(), keep
