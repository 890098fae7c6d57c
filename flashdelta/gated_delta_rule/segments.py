"""Segments of a context-parallel plan as token ranges on the device, and the truncation test.

The kernels' CP forward (``hopper/context_parallel.py``) runs a plan's segments as independent
sequences of the packed token axis. This module holds what it needs that is plain PyTorch -- and so
is tested on the CPU against the chunk-layout specification in ``context_parallel``: the segment
table (built once per plan, on the host) and the warm-up spans (device ops, no synchronisation).

Warm-up windows. Where segment j may be truncated (its summed log-decay G_j <= -tau and
0 <= beta |k|^2 <= 2 on all its tokens), the state leaving it is taken as the state reached from
zero over its shortest chunk-aligned suffix whose decay is already <= -tau: what is dropped is that
suffix's transition applied to the true state at the suffix's start, at most e^-tau of its norm
(the bound of ``context_parallel``, with the window in place of the segment). With g = -0.05 per
token a window is ~4 chunks, so the warm-up of a decaying head costs a few chunk steps, whatever L.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .inputs import sequence_starts
from .planner import CHUNK, Plan


@dataclass(frozen=True)
class SegmentTable:
    """Device-side bookkeeping of a plan's segments (built once per plan and device)."""

    order: torch.Tensor           # [N, J] int32 segment index of the j-th segment of sequence n; S = "none"
    last: torch.Tensor            # [N] index of each sequence's last segment; S = "none"
    spans: torch.Tensor           # [S + 1, 2] int32 (first token, length); the last row is the empty "none"
    tokens: torch.Tensor          # [S, L, CHUNK] int64 token index by chunk of each segment; padding = T
    is_last: torch.Tensor         # [S] bool: the last segment of its sequence (its R and M are never used)
    seq_lens: tuple[int, ...]     # host lengths of the segments

    @staticmethod
    @lru_cache(maxsize=64)
    def build(plan: Plan, seq_lens: tuple[int, ...], batched_len: int | None, device: torch.device):
        offsets = sequence_starts(seq_lens, batched_len)
        starts = [offsets[n] + s for n, s, _ in plan.segments]
        lens = [t for _, _, t in plan.segments]
        S = len(lens)
        per_seq = [[] for _ in seq_lens]
        for i, (n, _, _) in enumerate(plan.segments):
            per_seq[n].append(i)
        J = max((len(p) for p in per_seq), default=0)
        order = [p + [S] * (J - len(p)) for p in per_seq]
        last = [p[-1] if p else S for p in per_seq]
        total = len(seq_lens) * batched_len if batched_len is not None else sum(seq_lens)
        offset = torch.arange(plan.segment_chunks * CHUNK).view(1, plan.segment_chunks, CHUNK)
        first, count = torch.tensor(starts).view(S, 1, 1), torch.tensor(lens).view(S, 1, 1)
        tokens = torch.where(offset < count, first + offset, total)

        def dev(x, dtype=torch.int64):
            return torch.as_tensor(x, dtype=dtype).to(device)
        return SegmentTable(dev(order, torch.int32).reshape(len(seq_lens), J), dev(last),
                            dev([[s, t] for s, t in zip(starts, lens)] + [[0, 0]], torch.int32),
                            dev(tokens), dev([i in set(last) for i in range(S)], torch.bool), tuple(lens))


def warmup_spans(g, beta, k, table: SegmentTable, group: int, use_qk_l2norm: bool, tau: float):
    """What the warm-up computes per (segment, value head), and how the scan combines it.

    Returns ``spans`` [S + 1, HV, 4] int32 -- (R first token, R length, M first token, M length):
    the whole segment for both where it cannot be truncated, the window for R and nothing for M
    where it can, nothing for a sequence's last segment (unused) nor the "none" row -- and ``keep``
    [S + 1, HV] float32, 1 where the scan applies M (0 where truncated or unused).
    """
    HV = g.shape[-1]
    pad = lambda x: torch.cat([x.reshape(-1, HV), x.new_zeros(1, HV)])          # row T: padding
    decay = pad(g.double())[table.tokens].sum(2)                                 # [S, L, HV] per chunk
    k2 = k.reshape(-1, k.shape[-2], k.shape[-1]).float().square().sum(-1)        # [T, H]
    if use_qk_l2norm:
        k2 = k2 / (k2 + 1e-6)
    bk = beta.reshape(-1, HV).float() * k2.repeat_interleave(group, dim=1)
    violated = pad((bk < 0) | (bk > 2))[table.tokens].flatten(1, 2).any(1)       # [S, HV]
    # suffix sums are non-increasing towards the segment's start: the chunks from which the rest of the
    # segment decays by tau or more form a prefix; the window starts at its last chunk
    reaching = (decay.flip(1).cumsum(1).flip(1) <= -tau).sum(1)                  # [S, HV]
    truncate = (reaching > 0) & ~violated
    used = ~table.is_last[:, None]
    first, length = (x[:-1, None].long() for x in table.spans.unbind(1))         # [S, 1]
    skip = torch.where(truncate, (reaching - 1) * CHUNK, 0)
    r_len = (length - skip) * used
    m_len = length * (used & ~truncate)
    spans = torch.stack([(first + skip).expand_as(r_len), r_len, first.expand_as(m_len), m_len], dim=-1)
    spans = torch.cat([spans, spans.new_zeros(1, HV, 4)]).int()
    keep = torch.cat([(used & ~truncate).float(), g.new_zeros(1, HV, dtype=torch.float32)])
    return spans, keep
