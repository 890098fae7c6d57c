"""Context-parallel forward on top of any varlen forward (DESIGN section 3; math in ``context_parallel``).

``forward`` is a function with ``hopper_forward``'s signature that runs independent sequences given
by ``cu_seqlens``. Segments of the plan are such sequences, so the three CP steps are three calls:

1. warm-up: every segment from a zero state gives R_j; the same call with v = 0 and an identity
   initial state gives the transition M_j (the state map of a segment is linear in its start);
2. the scan S_{j+1} = M_j S_j + R_j over each sequence's segments, dropping M_j S_j where the
   gate-driven truncation holds (cumulative log-decay <= -tau and 0 <= beta |k|^2 <= 2 in segment j);
3. the output pass over the segments, each started from its S_j.

The same driver runs on the PyTorch path, which is how it is tested on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .context_parallel import TRUNCATION_TAU
from .inputs import Problem
from .planner import Plan


@dataclass(frozen=True)
class SegmentTable:
    """Device-side bookkeeping of a plan's segments (built once per plan and device)."""

    cu_seqlens: torch.Tensor      # [S + 1] token offsets of the segments, int32
    starts: torch.Tensor          # [S] first token of each segment, int64
    ends: torch.Tensor            # [S] one past its last token, int64
    order: torch.Tensor           # [N, J] int32 segment index of the j-th segment of sequence n; S = "none"
    last: torch.Tensor            # [N] index of each sequence's last segment; S = "none"
    spans: torch.Tensor           # [S + 1, 2] int32 (first token, length); the last row is the empty "none"
    seq_lens: tuple[int, ...]     # host lengths of the segments

    @staticmethod
    @lru_cache(maxsize=64)
    def build(plan: Plan, seq_lens: tuple[int, ...], batched_len: int | None, device: torch.device):
        offsets = [n * batched_len for n in range(len(seq_lens))] if batched_len is not None else \
            [sum(seq_lens[:n]) for n in range(len(seq_lens))]
        starts = [offsets[n] + s for n, s, _ in plan.segments]
        lens = [t for _, _, t in plan.segments]
        S = len(lens)
        per_seq = [[i for i, (n, _, _) in enumerate(plan.segments) if n == m] for m in range(len(seq_lens))]
        J = max((len(p) for p in per_seq), default=0)
        order = [p + [S] * (J - len(p)) for p in per_seq]
        last = [p[-1] if p else S for p in per_seq]
        cu = [0]
        for t in lens:
            cu.append(cu[-1] + t)

        def dev(x, dtype=torch.int64):
            return torch.tensor(x, dtype=dtype).to(device)
        return SegmentTable(dev(cu, torch.int32), dev(starts), dev([s + t for s, t in zip(starts, lens)]),
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


def scan_segments(R, M, truncate, h0, table: SegmentTable):
    """States entering each segment [S, HV, K, V]: S_{j+1} = M_j S_j (unless truncated) + R_j."""
    S_count, HV, K, V = R.shape
    N = table.order.shape[0]
    eye = torch.eye(K, dtype=M.dtype, device=M.device).expand(1, HV, K, K)
    M = torch.cat([M, eye])                         # the "none" segment is the identity
    R = torch.cat([R, R.new_zeros(1, HV, K, V)])
    keep = torch.cat([~truncate, truncate.new_ones(1, HV)])[..., None, None]
    state = h0.to(R.dtype) if h0 is not None else R.new_zeros(N, HV, K, V)
    starts = R.new_empty(S_count + 1, HV, K, V)
    for j in range(table.order.shape[1]):
        idx = table.order[:, j].long()
        starts[idx] = state
        state = torch.where(keep[idx], M[idx] @ state, 0.0) + R[idx]
    return starts[:-1]


def context_parallel_forward(forward, q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                             use_qk_l2norm_in_kernel: bool, problem: Problem, batched: bool,
                             state_v_first: bool, plan: Plan, tau: float | None = TRUNCATION_TAU):
    """The forward by segments; same results as ``forward`` on the whole sequences (within the bound)."""
    assert plan.context_parallel and problem.k_dim == problem.v_dim, "CP needs K == V (M rides in v's place)"
    B, T, HV, K = problem.batch, problem.tokens, problem.v_heads, problem.k_dim
    table = SegmentTable.build(plan, problem.seq_lens, T if batched else None, q.device)
    flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
    qf, kf, vf, gf, bf = flat
    S = len(table.seq_lens)

    # 1. warm-up: R_j from zero and M_j = (segment map applied to I, with v = 0), in one call
    eye = torch.eye(K, dtype=torch.float32, device=q.device).expand(S, HV, K, K)
    pair = lambda x: torch.cat([x, x], dim=1)
    _, ends = forward(pair(qf), pair(kf), torch.cat([vf, torch.zeros_like(vf)], dim=1), pair(gf), pair(bf),
                      scale, torch.cat([torch.zeros_like(eye), eye]), True, use_qk_l2norm_in_kernel,
                      torch.cat([table.cu_seqlens, table.cu_seqlens[1:] + B * T]),
                      table.seq_lens * 2, False)
    R, M = ends[:S], ends[S:]

    # 2. scan over each sequence's segments
    if tau is None:
        truncate = torch.zeros(S, HV, dtype=torch.bool, device=q.device)
    else:
        truncate = truncatable(gf, bf, kf, table, problem.group, use_qk_l2norm_in_kernel, tau)
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    starts = scan_segments(R, M, truncate, h0, table)

    # 3. output pass from the corrected starts
    o, seg_final = forward(qf, kf, vf, gf, bf, scale, starts, True, use_qk_l2norm_in_kernel,
                           table.cu_seqlens, table.seq_lens, False)
    final = None
    if output_final_state:
        kept = h0.to(seg_final.dtype) if h0 is not None else seg_final.new_zeros(problem.num_seqs, HV, K, K)
        padded = torch.cat([seg_final, kept])
        fallback = torch.arange(problem.num_seqs, device=q.device) + S      # sequences with no segment keep h0
        final = padded[torch.where(table.last < S, table.last, fallback)]
        final = final.transpose(-1, -2).contiguous() if state_v_first else final
    return o.reshape(B, T, *o.shape[2:]), final
