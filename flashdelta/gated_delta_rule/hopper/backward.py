"""Hopper backward: glue between autograd and the backward's kernels (``chunked_backward`` on the device).

The forward saves its inputs and (``planner.TUNING["forward_stores_states"]``) the state entering
every chunk; the backward recomputes the rest, stage by stage:

1. ``chunk_matrices`` again, now also writing the gated inverse ``A0g`` (and beta in the row factors);
2. ``chunk_recurrence`` (``save_states``): the state entering every chunk, q's dtype, unless the
   forward stored them as it walked (what a call under autograd does);
3. ``state_gradient``: chunks last to first, the state's gradient leaving every chunk, dv and dh0;
4. ``chunk_gradients``: every chunk at once, dq and dk per q/k head (its GVA group summed and the
   l2-norm's backward applied in the kernel), dbeta and dg per value head.

So the memory kept from forward to backward is the inputs and, stored, one per-chunk state in q's
dtype (32 KB per chunk and value head, as FLA's h), written once by the forward instead of a serial
recompute (a whole sequence's walk, which the forward may have split into segments); the backward adds the
per-chunk operators (as the forward's) and the per-chunk state gradients (as FLA's dh).
"""
import functools

import torch

from ..inputs import host_table
from .chunk_gradients import chunk_gradients_kernel
from .chunk_matrices import CHUNK
from .forward import (DTYPES, HEAD_DIM, MAX_GRID_Z, _compile, _tables, entry, flat, on_device, prepare, ready,
                      recurrence_kernel, sequence_rows, sizes, unused_rows)
from .state_gradient import state_gradient_kernel

WALK_V_TILES = (64, 128)             # state_gradient variants: V columns per CTA


def variants(dtype: str):
    """The backward's own kernels for ``dtype`` (the forward's module lists them with its own)."""
    out = [(f"chunk_gradients[{dtype}]", functools.partial(gradients_kernel, dtype))]
    for bv in WALK_V_TILES:
        out.append((f"state_gradient[{dtype},BV={bv}]", functools.partial(walk_kernel, dtype, bv)))
    return out


@functools.lru_cache(maxsize=None)
def gradients_kernel(dtype: str):
    return _compile(chunk_gradients_kernel, HEAD_DIM, HEAD_DIM, dtype, fast_math=True)


@functools.lru_cache(maxsize=None)
def walk_kernel(dtype: str, bv: int):
    return _compile(state_gradient_kernel, HEAD_DIM, HEAD_DIM, bv, dtype, fast_math=True)


@functools.lru_cache(maxsize=256)
def _walk_table(seq_lens: tuple[int, ...], stride: int | None, device: torch.device):
    """(first token, length, first chunk) per sequence: the recompute's and the walk's table."""
    rows = [x for row in sequence_rows(seq_lens, stride) for x in row]
    return host_table(rows, torch.int32, device).reshape(-1, 3)


def hopper_backward(q, k, v, g, beta, scale: float, initial_state, use_qk_l2norm_in_kernel: bool, cu_seqlens,
                    seq_lens, state_v_first: bool, do, dht, needs_dh0: bool = True, walk_tile: int = 64,
                    state_tile: int = 128, states=None):
    """Gradients (dq, dk, dv, dg, dbeta, dh0) of ``hopper_forward``'s call; dh0 is None without an
    initial state (or when ``needs_dh0`` is False). ``dht``: the final state's gradient, or None.
    ``walk_tile`` / ``state_tile``: V columns per CTA of the state-gradient walk / the state recompute
    (``planner.backward_tiles``). ``states``: the state entering every chunk as the forward stored it
    (``hopper_forward(save_states=True)``), or None to recompute them."""
    B, Tn, H, K, HV, V, seq_lens, N, tokens, stride, dev = sizes(q, v, seq_lens, cu_seqlens)
    store_dh0 = initial_state is not None and needs_dh0
    dh0 = torch.empty(N, HV, K * V, dtype=torch.float32, device=dev) if store_dh0 else None
    dv = torch.empty(tokens, HV, V, dtype=q.dtype, device=dev)
    if dht is not None:
        dht = flat(dht, N, HV, K * V, dtype=torch.float32)

    if tokens == 0 or sum(seq_lens) == 0:
        dv.zero_()
        dq, dk = (torch.zeros(tokens, H, K, dtype=q.dtype, device=dev) for _ in range(2))
        dg, dbeta = (torch.zeros(tokens, HV, dtype=torch.float32, device=dev) for _ in range(2))
        if dh0 is not None:
            dh0.copy_(dht) if dht is not None else dh0.zero_()
    else:
        ready(DTYPES[q.dtype])
        _, chunks = _tables(seq_lens, stride, dev)
        seqs = _walk_table(seq_lens, stride, dev)
        assert seqs.shape[0] <= MAX_GRID_Z and chunks.shape[0] <= MAX_GRID_Z, "too many sequences / chunks"
        qf, kf, vf, dof = flat(q, tokens, H, K), flat(k, tokens, H, K), flat(v, tokens, HV, V), flat(do, tokens, HV, V)
        h0 = None if initial_state is None else flat(initial_state, N, HV, K * V, dtype=torch.float32)
        a0g = torch.empty(tokens, HV, CHUNK, dtype=q.dtype, device=dev)
        dstates = torch.empty(chunks.shape[0], HV, V, K, dtype=q.dtype, device=dev)
        no_state = unused_rows(HV, K * V, torch.float32, dev)
        v_first = int(bool(state_v_first))
        with on_device(dev):
            ag, coef, _ = prepare(qf, kf, g, beta, chunks, HV, scale, use_qk_l2norm_in_kernel, a0g=a0g)
            if states is None:
                states = torch.empty_like(dstates)
                entry(recurrence_kernel(DTYPES[q.dtype], state_tile, save_states=True))(
                    qf, kf, vf, ag, coef, seqs, h0 if h0 is not None else no_state, vf, no_state, states,
                    int(h0 is not None), 0, v_first)
            entry(walk_kernel(DTYPES[q.dtype], walk_tile))(
                qf, kf, dof, ag, coef, seqs, dht if dht is not None else no_state, dv,
                dh0 if dh0 is not None else no_state, dstates, int(dht is not None), int(dh0 is not None), v_first)
            dq, dk, dbeta, dg = chunk_gradients(qf, kf, vf, dof, dv, a0g, coef, chunks, states, dstates, scale,
                                                 use_qk_l2norm_in_kernel)

    if dh0 is not None:
        dh0 = dh0.view(N, HV, V, K) if state_v_first else dh0.view(N, HV, K, V)
        dh0 = dh0.to(initial_state.dtype)
    return finish_gradients(q, k, g, beta, dq, dk, dv, dg, dbeta, dh0)


def chunk_gradients(qf, kf, vf, dof, dv, a0g, coef, chunks, states, dstates, scale: float, l2norm: bool):
    """``chunk_gradients`` over every chunk: dq and dk per q/k head (summed over its GVA group, through
    the l2-norm's backward where ``l2norm``, q's dtype), dbeta and dg per value head (fp32)."""
    tokens, H, K = qf.shape
    HV = vf.shape[1]
    dq, dk = (torch.empty(tokens, H, K, dtype=qf.dtype, device=qf.device) for _ in range(2))
    dbeta, dg = (torch.empty(tokens, HV, dtype=torch.float32, device=qf.device) for _ in range(2))
    entry(gradients_kernel(DTYPES[qf.dtype]))(qf, kf, vf, dof, dv, a0g, coef, chunks, states, dstates, dq, dk, dbeta,
                                              dg, float(scale), int(bool(l2norm)))
    return dq, dk, dbeta, dg


def finish_gradients(q, k, g, beta, dq, dk, dv, dg, dbeta, dh0):
    """Every gradient in its input's dtype and shape."""
    B, Tn, H, K = q.shape
    return (dq.view(B, Tn, H, K), dk.view(B, Tn, H, K), dv.view(*q.shape[:2], *dv.shape[1:]),
            dg.to(g.dtype).view(g.shape), dbeta.to(beta.dtype).view(beta.shape), dh0)
