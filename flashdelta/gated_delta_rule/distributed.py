"""Context parallelism across processes (``torch.distributed``): one token stream split over ranks.

The packed token stream of a call (total T tokens, sequences given by the global ``cu_seqlens``) is cut
into P equal parts, P = world size (``contiguous``: rank r holds part r) or twice it (``zigzag``: rank
r holds parts r and 2W - 1 - r, as ``[front; back]``, which balances causal attention layers beside).
A sequence may span parts. Each rank calls the op on its own tokens only, with the local ``cu_seqlens``
(the global boundaries clipped to its parts), and gets o for its tokens (FLA's ``cp_context``
convention, so ``FLACPContext`` is accepted as well as ``CPContext``).

The state entering a part is affine in the state entering the part before it (DESIGN sections 3 and
7): over a part, S_out = M S_in + R, with R the state reached from zero and M the transition. So:

1. each rank computes, for each of its parts whose last sequence continues into the next part, the
   summary (R, M) of that last local sequence (M only where the part lies inside one sequence, which
   is the only case a later part applies it; zeros elsewhere, so that every rank sends one shape);
2. one all-gather exchanges the summaries, ``[parts per rank, HV, K, V + K]`` per rank, bytes
   proportional to heads x K x (K + V) and not to tokens;
3. each rank composes the state entering the first sequence of each of its parts from the parts
   before it (R of the part where the sequence starts, then M S + R through the parts it crosses) and
   runs its tokens from there.

The backward is autograd's: the exchange's backward returns each summary's gradient to the rank that
computed it (one all-reduce of the gathered bytes: the state gradient walking back through the ranks,
DESIGN section 7), and every local piece is differentiable. The summaries are the op's own calls
(from zero, and from the identity with v = 0), so they and the local pass take the kernels where
they apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class CPContext:
    """flashdelta's own context: the process group, the layout and the global sequence boundaries
    (``cu_seqlens`` of the whole stream, on the host; None = one sequence of all the tokens)."""

    group: object = None
    layout: str = "contiguous"
    cu_seqlens: object = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"`cp_context.layout`: expected one of {LAYOUTS}, got {self.layout!r}")


@dataclass(frozen=True)
class Part:
    """One part of the stream held by this rank: its chain position, its tokens in the local buffer,
    and how many parts before / after it share its first / last sequence."""

    position: int
    start: int              # first local token
    length: int
    local_seqs: range       # local sequences (rows of the local cu_seqlens) inside this part
    pre: int
    post: int


@dataclass(frozen=True)
class Chain:
    parts: tuple[Part, ...]
    num_positions: int
    local_cu_seqlens: tuple[int, ...]


def check_context(cp_context) -> None:
    if not (isinstance(cp_context, CPContext) or _is_fla(cp_context)):
        raise TypeError(f"`cp_context`: expected flashdelta.CPContext or FLA's FLACPContext, "
                        f"got {type(cp_context).__name__}")


def require_initialised() -> None:
    import torch.distributed as dist
    if not dist.is_initialized():
        raise ValueError("`cp_context`: torch.distributed is not initialised (init_process_group first)")


def _is_fla(ctx) -> bool:
    return hasattr(ctx, "pre_num_ranks") and hasattr(ctx, "cu_seqlens_cpu")


def chain_of(cp_context, local_tokens: int, rank: int, world: int) -> Chain:
    """The rank's parts from a ``CPContext`` or an FLA ``FLACPContext`` (read by its fields)."""
    if isinstance(cp_context, CPContext):
        return _from_global(cp_context, local_tokens, rank, world)
    return _from_fla(cp_context, local_tokens, rank, world)


def _from_global(ctx: CPContext, local_tokens: int, rank: int, world: int) -> Chain:
    P = world if ctx.layout == "contiguous" else 2 * world
    part_len = local_tokens * world // P
    total = part_len * P
    bounds = [0, total] if ctx.cu_seqlens is None else [int(x) for x in torch.as_tensor(ctx.cu_seqlens).tolist()]
    if bounds[-1] != total or bounds[0] != 0:
        raise ValueError(f"`cp_context.cu_seqlens`: expected offsets from 0 to the stream's {total} tokens "
                         f"({local_tokens} on each of {world} ranks), got {bounds[0]}..{bounds[-1]}")
    positions = [rank] if ctx.layout == "contiguous" else [rank, P - 1 - rank]
    parts, local = [], [0]
    for i, pos in enumerate(positions):
        a, b = pos * part_len, (pos + 1) * part_len
        cuts = sorted({a, b, *(x for x in bounds if a < x < b)})
        first_seq = max(j for j, x in enumerate(bounds) if x <= a)        # the sequence holding token a
        last_seq = max(j for j, x in enumerate(bounds) if x < b)          # the one holding token b - 1
        pre = pos - bounds[first_seq] // part_len
        post = (bounds[last_seq + 1] - 1) // part_len - pos
        row0 = len(local) - 1
        local += [i * part_len + c - a for c in cuts[1:]]
        parts.append(Part(pos, i * part_len, part_len, range(row0, len(local) - 1), pre, post))
    return Chain(tuple(parts), P, tuple(local))


def _from_fla(ctx, local_tokens: int, rank: int, world: int) -> Chain:
    cu = [int(x) for x in torch.as_tensor(ctx.cu_seqlens_cpu if ctx.cu_seqlens_cpu is not None
                                          else ctx.cu_seqlens).tolist()]
    if getattr(ctx, "layout", "contiguous") == "zigzag":
        half = ctx.part_len
        front = ctx.front_num_seqs
        parts = (Part(rank, 0, half, range(0, front), ctx.pre_num_ranks_by_part[0], ctx.post_num_ranks_by_part[0]),
                 Part(2 * world - 1 - rank, half, half, range(front, len(cu) - 1), ctx.pre_num_ranks_by_part[1],
                      ctx.post_num_ranks_by_part[1]))
        return Chain(parts, 2 * world, tuple(cu))
    return Chain((Part(rank, 0, local_tokens, range(0, len(cu) - 1), ctx.pre_num_ranks, ctx.post_num_ranks),),
                 world, tuple(cu))


def summary(op, q, k, v, g, beta, with_transition: bool):
    """(R, M) of one local sequence ``[1, L, ...]``, by the op itself (``op(q, k, v, g, beta, h0, cu)``
    returns (o, final state); kernels where they apply, differentiable): R, the state reached from
    zero, ``[HV, K, V]``; M, the transition ``[HV, K, K]``, the state reached from the identity with
    v = 0, or zeros where ``with_transition`` is False (no later part needs it)."""
    R = op(q, k, v, g, beta, None, None)[1][0]
    HV, K = v.shape[2], k.shape[3]
    if not with_transition:
        return R, R.new_zeros(HV, K, K)
    eye = torch.eye(K, dtype=R.dtype, device=R.device).expand(1, HV, K, K).contiguous()
    M = op(q, k, v.new_zeros(*v.shape[:3], K), g, beta, eye, None)[1][0]
    return R, M


def cp_forward(q, k, v, g, beta, cu_seqlens, state_v_first: bool, cp_context, op):
    """The op under ``cp_context`` (arguments validated by the caller; ``op(q, k, v, g, beta, h0, cu)``
    runs the op on this rank: (o, final states, K-major)). Returns (o, final states of the local
    sequences, in the call's layout)."""
    import torch.distributed as dist

    group = getattr(cp_context, "group", None)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if q.shape[0] != 1:
        raise ValueError(f"`q`: under cp_context the local tokens are packed, expected B = 1, got B={q.shape[0]}")
    chain = chain_of(cp_context, q.shape[1], rank, world)
    # the local boundaries come from the context; a given cu_seqlens is compared with them where that costs
    # no device read (on the host), and by its length elsewhere
    if cu_seqlens is not None and (len(cu_seqlens) != len(chain.local_cu_seqlens) or (
            not cu_seqlens.is_cuda and tuple(cu_seqlens.tolist()) != chain.local_cu_seqlens)):
        raise ValueError(f"`cu_seqlens`: under cp_context, expected the local boundaries "
                         f"{list(chain.local_cu_seqlens)[:8]}, got {len(cu_seqlens)} offsets")
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    cu = chain.local_cu_seqlens

    sent = []
    for part in chain.parts:
        if part.post > 0:                                   # the part's last sequence goes on: its summary
            a, b = cu[part.local_seqs[-1]], cu[part.local_seqs[-1] + 1]
            inside = part.pre > 0 and len(part.local_seqs) == 1     # the part lies inside one sequence
            R, M = summary(op, *(x[:, a:b] for x in (q, k, v, g, beta)), inside)
            sent.append(torch.cat([R.to(dtype), M.to(dtype)], dim=-1))
        else:
            sent.append(torch.zeros(HV, K, V + K, dtype=dtype, device=q.device))
    gathered = _Exchange.apply(_tied(torch.stack(sent), q, k, v, g, beta), group)   # [world, parts, HV, K, V + K]
    by_position = {}
    for r, rows in enumerate(gathered):
        for i, pos in enumerate([r] if len(chain.parts) == 1 else [r, chain.num_positions - 1 - r]):
            by_position[pos] = rows[i]

    h0 = _tied(torch.zeros(len(cu) - 1, HV, K, V, dtype=dtype, device=q.device), gathered)
    starts = []
    for part in chain.parts:
        if part.pre > 0 and len(part.local_seqs):
            first = part.position - part.pre
            S = by_position[first][..., :V]
            for pos in range(first + 1, part.position):
                row = by_position[pos]
                S = row[..., V:] @ S + row[..., :V]
            starts.append((part.local_seqs[0], S))
    if starts:
        index = torch.tensor([i for i, _ in starts], device=q.device)
        h0 = h0.index_copy(0, index, torch.stack([S for _, S in starts]))
    o, final = op(q, k, v, g, beta, h0, torch.tensor(cu, dtype=torch.int32))
    return o, (final.transpose(-1, -2) if state_v_first else final)


def _tied(x, *inputs):
    """``x`` made to depend, in autograd's graph, on those ``inputs`` that require grad (through empty
    slices: no work, a zero gradient). The exchange's backward is a collective that every rank must
    enter, so it must be in every rank's graph: also on a rank that sends no summary (its parts' last
    sequences end there) or uses none (its parts' first sequences start there)."""
    for y in inputs:
        if y.requires_grad:
            x = x + y.reshape(-1)[:0].sum()
    return x


class _Exchange(torch.autograd.Function):
    """All-gather of every rank's summaries; its backward sums the summaries' gradients over the ranks
    and returns each rank its own (an all-reduce of the same bytes: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        ctx.group, ctx.rank = group, dist.get_rank(group)
        rows = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, x.contiguous(), group=group)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None
