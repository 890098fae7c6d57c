"""Hopper decode: glue between the serving path and the ``recurrent_step`` kernel.

A decode call is one launch: the kernel reads each sequence's state from its slot (a pool, or the
dense ``initial_state`` with rows 0..N-1), walks its few tokens and writes the state back, to the same
pool in place or to a new dense final state. Tables of rows are device tensors the caller already
has (``state_indices``) or small cached ones (rows 0..N-1, or none); nothing is read on the host.
"""
import functools

import torch

from ..inputs import host_table
from ..planner import TUNING
from .forward import DTYPES, HEAD_DIM, _compile, _tables, entry, flat, on_device
from .recurrent_step import recurrent_step_kernel

V_TILES = {32: 128, 8: 32}             # V columns per CTA -> threads (TUNING["decode_v_tile"] picks one)
POOL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ALIGN = 16                              # bytes: the pool's rows are stored by TMA


def variants(dtype: str):
    """The decode kernel for q/k/v ``dtype``: one per pool dtype, layout and V tile."""
    return [(f"recurrent_step[{dtype},pool={pd},{'V-major' if vf else 'K-major'},BV={bv}]",
             functools.partial(step_kernel, dtype, pd, vf, bv))
            for pd in POOL_DTYPES.values() for vf in (False, True) for bv in V_TILES]


@functools.lru_cache(maxsize=None)
def step_kernel(dtype: str, pool_dtype: str, v_first: bool, bv: int):
    return _compile(recurrent_step_kernel, HEAD_DIM, HEAD_DIM, bv, dtype, pool_dtype, v_first, threads=V_TILES[bv])


def pool_unsupported(pool: torch.Tensor) -> str | None:
    """Why the kernel cannot index this pool in place, or None."""
    if pool.dtype not in POOL_DTYPES:
        return f"the decode kernel takes float32/bfloat16/float16 pools, got {pool.dtype}"
    if pool.data_ptr() % ALIGN or (pool.stride(0) * pool.element_size()) % ALIGN:
        return "the pool's rows are not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=64)
def dense_rows(n: int, present: bool, device: torch.device) -> torch.Tensor:
    """Rows 0..n-1 (a dense state), or n rows of -1 (none)."""
    return host_table(list(range(n)) if present else [-1] * n, torch.int32, device)


@functools.lru_cache(maxsize=16)
def _no_steps(device: torch.device) -> torch.Tensor:
    return torch.full((1, 1), -1, dtype=torch.int32, device=device)


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 and x.is_contiguous() else x.to(torch.int32).contiguous()


def hopper_decode(q, k, v, g, beta, scale: float, pool_in, first_rows, pool_out, out_rows, step_rows,
                  use_qk_l2norm_in_kernel: bool, seq_lens, batched: bool, state_v_first: bool, gating=None):
    """o ``[B, T, HV, V]``; the states go to ``pool_out`` (rows ``out_rows``, or ``step_rows`` per token).

    ``pool_in`` / ``pool_out``: ``[slots, HV, K, V]`` (``[slots, HV, V, K]``) of one dtype, possibly one
    tensor; ``first_rows`` / ``out_rows`` ``[N]``, ``step_rows`` ``[N, steps]`` or None. ``gating``:
    None (g, beta are the log-decay and beta), or (A_log or None, dt_bias or None, beta_scale): g is
    activated in the kernel where A_log is given, beta where beta_scale > 0 (see ``recurrent_step``)."""
    B, Tn, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    tokens, dev = B * Tn, q.device
    o = torch.empty(B, Tn, HV, V, dtype=q.dtype, device=dev)
    if tokens == 0 or not seq_lens:
        return o
    seqs, _ = _tables(tuple(seq_lens), Tn if batched else None, dev)
    kernel = entry(step_kernel(DTYPES[q.dtype], POOL_DTYPES[pool_in.dtype], bool(state_v_first),
                               TUNING["decode_v_tile"]))
    per_step = step_rows is not None
    a_log, dt_bias, beta_scale = (None, None, 0.0) if gating is None else gating
    gate_in_kernel = a_log is not None
    a_log, dt_bias = (_no_heads(HV, dev) if x is None else flat(x, HV, dtype=torch.float32) for x in (a_log, dt_bias))
    with on_device(dev):
        kernel(flat(q, tokens, H, K), flat(k, tokens, H, K), flat(v, tokens, HV, V),
               flat(g, tokens, HV, dtype=torch.float32), flat(beta, tokens, HV, dtype=torch.float32), seqs,
               _int32(first_rows), _int32(out_rows), _int32(step_rows) if per_step else _no_steps(dev),
               pool_in, pool_out, o.view(tokens, HV, V), a_log, dt_bias, float(scale), float(beta_scale),
               int(bool(use_qk_l2norm_in_kernel)), int(per_step), int(gate_in_kernel))
    return o


@functools.lru_cache(maxsize=64)
def _no_heads(HV: int, device: torch.device) -> torch.Tensor:
    """Zeros per value head: dt_bias when there is none (and the unused A_log)."""
    return torch.zeros(HV, dtype=torch.float32, device=device)
