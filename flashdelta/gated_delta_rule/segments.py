"""Segments of a context-parallel plan as token ranges on the device, and the truncation test.

The kernels' CP forward (``hopper/context_parallel.py``) runs a plan's segments as independent
sequences of the packed token axis. This module holds what it needs that is plain PyTorch -- and so
is tested on the CPU against the chunk-layout specification in ``context_parallel``: the segment
table (built once per plan, on the host) and the per-(segment, head) truncation decision (device ops,
no synchronisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .inputs import sequence_starts
from .planner import Plan


@dataclass(frozen=True)
class SegmentTable:
    """Device-side bookkeeping of a plan's segments (built once per plan and device)."""

    starts: torch.Tensor          # [S] first token of each segment, int64
    ends: torch.Tensor            # [S] one past its last token, int64
    order: torch.Tensor           # [N, J] int32 segment index of the j-th segment of sequence n; S = "none"
    last: torch.Tensor            # [N] index of each sequence's last segment; S = "none"
    spans: torch.Tensor           # [S + 1, 2] int32 (first token, length); the last row is the empty "none"
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

        def dev(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype).to(device)
        return SegmentTable(dev(starts), dev([s + t for s, t in zip(starts, lens)]),
                            dev(order, torch.int32).reshape(len(seq_lens), J), dev(last),
                            dev([[s, t] for s, t in zip(starts, lens)] + [[0, 0]], torch.int32), tuple(lens))


def truncatable(g, beta, k, table: SegmentTable, group: int, use_qk_l2norm: bool, tau: float):
    """[S, HV] bool: where segment j's transition may be dropped (its norm bound <= e^-tau)."""
    g, beta = g.reshape(-1, g.shape[-1]), beta.reshape(-1, beta.shape[-1])       # [T, HV]
    k2 = k.reshape(-1, k.shape[-2], k.shape[-1]).float().square().sum(-1)        # [T, H]
    if use_qk_l2norm:
        k2 = k2 / (k2 + 1e-6)
    bk = beta.float() * k2.repeat_interleave(group, dim=1)
    bad = ((bk < 0) | (bk > 2)).double()
    # prefix sums along time as contiguous [HV, T] rows: a CUDA scan over the leading dim of [T, HV]
    # runs one serial thread per column -- the likely cause of the 0.36 us per token that the CP
    # forward measured on an H100 with that layout (not yet re-measured with this one)
    zero = g.new_zeros(g.shape[1], 1, dtype=torch.float64)
    G = torch.cat([zero, g.double().t().contiguous().cumsum(1)], dim=1)
    B = torch.cat([zero, bad.t().contiguous().cumsum(1)], dim=1)
    decay = (G[:, table.ends] - G[:, table.starts]).t()
    violations = (B[:, table.ends] - B[:, table.starts]).t()
    return (decay <= -tau) & (violations == 0)
