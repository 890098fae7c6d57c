"""Hopper forward: glue between the public API and the two TileLang kernels.

``chunk_matrices`` (parallel over chunks x q/k heads) writes the state-independent per-chunk
operators; ``chunk_recurrence`` (one CTA per sequence x value head x V tile) walks the chunks.
Batched inputs are treated as B sequences packed back to back, so both cases share one pair of
kernels. Lengths and head counts are dynamic: kernels compile once per (dtype, V tile, variant); the
tables of sequences and chunks are built on the host from ``seq_lens`` (no device sync) and cached.
"""
import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import tilelang
import torch

from ..inputs import host_table, sequence_starts, sm_count
from ..planner import prep_heads_per_cta
from .chunk_matrices import CHUNK, COEFS, chunk_matrices_kernel
from .chunk_recurrence import chunk_recurrence_kernel

TARGET = {"kind": "cuda", "arch": "sm_90a"}
HEAD_DIM = 128
V_TILES = (128, 64)                       # recurrence variants: V columns per CTA
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_GRID_Z = 65535

compilations = 0                          # kernels built in this process (tests check new lengths add none)
_counting = threading.Lock()
# TileLang builds a prim_func by parsing its Python source (ast.parse), which CPython 3.11 does not
# allow from several threads at once ("AST constructor recursion depth mismatch"): tracing takes
# turns, lowering and nvcc still run in parallel.
_tracing = threading.Lock()


def supports(K: int, V: int) -> bool:
    return K == HEAD_DIM and V == HEAD_DIM


def variants(dtype: str | None = None):
    """Every kernel this module can launch (for ``dtype`` only, if given): (name, builder) pairs."""
    out = []
    for dt in DTYPES.values() if dtype is None else (dtype,):
        out.append((f"chunk_matrices[{dt}]", functools.partial(matrices_kernel, dt)))
        for bv in V_TILES:
            out.append((f"chunk_recurrence[{dt},BV={bv}]", functools.partial(recurrence_kernel, dt, bv)))
            out.append((f"chunk_recurrence[{dt},BV={bv},warmup]", functools.partial(recurrence_kernel, dt, bv, True)))
            out.append((f"chunk_recurrence[{dt},BV={bv},states]",
                        functools.partial(recurrence_kernel, dt, bv, save_states=True)))
            out.append((f"chunk_recurrence[{dt},BV={bv},output+states]",
                        functools.partial(recurrence_kernel, dt, bv, save_states=True, output=True)))
    from .backward import variants as backward_variants
    from .context_parallel import scan_kernel, windows_kernel
    from .decode import variants as decode_variants
    for dt in DTYPES.values() if dtype is None else (dtype,):
        out += backward_variants(dt) + decode_variants(dt)
    out.append((f"segment_scan[K={HEAD_DIM}]", functools.partial(scan_kernel, HEAD_DIM)))
    out.append(("segment_windows", windows_kernel))
    return out


@functools.lru_cache(maxsize=None)
def ready(dtype: str) -> None:
    """Builds every variant for ``dtype`` on its first use, all at once: nvcc runs in parallel, so a
    cold cache costs about the slowest build instead of their sum, and the planner's later choices
    (another V tile, context parallelism) never stall a call on a compilation."""
    todo = variants(dtype)
    with ThreadPoolExecutor(len(todo)) as pool:
        for _ in pool.map(lambda item: item[1](), todo):
            pass


def _compile(make, *args, fast_math: bool = False, **kwargs):
    """Builds ``make(*args, **kwargs)`` (a prim_func) for ``TARGET``."""
    global compilations
    with _counting:
        compilations += 1
    with _tracing:
        func = make(*args, **kwargs)
    return tilelang.compile(func, target=TARGET,
                            pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: fast_math})


@functools.lru_cache(maxsize=None)
def entry(kernel):
    """A compiled kernel's own entry point, called without TileLang's per-call Python adapter.

    Our kernels take every buffer as an argument (none for the adapter to allocate), so the adapter
    would only re-pack the arguments into the same list before calling this; the entry point takes
    the stream from torch itself (DLPack exchange), as it does when the adapter calls it. Measured by
    ``scripts/host_profile.py`` (its "launch" columns)."""
    adapter = kernel.adapter
    if adapter.result_idx or getattr(adapter, "_ffi_callee_allocated_output_abi", False):
        return kernel
    return adapter._get_executable()


def on_device(device: torch.device):
    """The context TileLang launches need: kernels go to the current device (its current stream), so
    switch to the tensors' device, but only when it is not current already (a switch costs host time)."""
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=None)
def matrices_kernel(dtype: str):
    # fast math: a quarter fewer instructions (its exps; arguments are <= 0), no measurable change on H100
    return _compile(chunk_matrices_kernel, HEAD_DIM, dtype, fast_math=True)


@functools.lru_cache(maxsize=None)
def recurrence_kernel(dtype: str, bv: int, warmup: bool = False, save_states: bool = False, output: bool = False):
    # fast math: P's exp2 becomes one ex2.approx instruction
    return _compile(chunk_recurrence_kernel, HEAD_DIM, HEAD_DIM, bv, dtype, threads=256 if bv == 128 else 128,
                    warmup=warmup, save_states=save_states, output=output, fast_math=True)


@functools.lru_cache(maxsize=256)
def _tables(seq_lens: tuple[int, ...], stride: int | None, device: torch.device):
    """Device tables: (first token, length, final-state row) per sequence and (first token, valid rows)
    per chunk.

    ``stride``: batched layout (sequence n starts at n * stride); None = packed back to back.
    """
    starts = sequence_starts(seq_lens, stride)
    seqs = [x for n, (s, L) in enumerate(zip(starts, seq_lens)) for x in (s, L, n)]
    chunks = [x for s, L in zip(starts, seq_lens) for c in range(0, L, CHUNK) for x in (s + c, min(CHUNK, L - c))]
    return (host_table(seqs, torch.int32, device).reshape(-1, 3),
            host_table(chunks, torch.int32, device).reshape(-1, 2))


def sequence_rows(seq_lens: tuple[int, ...], stride: int | None) -> list[tuple[int, int, int]]:
    """(first token, length, first chunk) per sequence, on the host."""
    rows, first = [], 0
    for s, L in zip(sequence_starts(seq_lens, stride), seq_lens):
        rows.append((s, L, first))
        first += -(-L // CHUNK)
    return rows


@functools.lru_cache(maxsize=256)
def _state_rows(seq_lens: tuple[int, ...], stride: int | None, device: torch.device):
    """(first token, length, final-state row, first chunk) per sequence: the table of the recurrence
    that also stores the state entering every chunk."""
    rows = [x for n, (s, L, c) in enumerate(sequence_rows(seq_lens, stride)) for x in (s, L, n, c)]
    return host_table(rows, torch.int32, device).reshape(-1, 4)


def hopper_forward(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                   use_qk_l2norm_in_kernel: bool, cu_seqlens, seq_lens, state_v_first: bool, v_tile: int = 128,
                   checkpoints=None, save_states: bool = False):
    """``checkpoints``: a ``checkpoints.Checkpoints`` of q's dtype to fill too, from a state-only walk
    that stores the state entering every chunk (the backward's recompute: those states are q's dtype,
    each rounded once from fp32, which is what such a buffer holds). ``save_states``: also return the
    state entering every chunk ([chunks, HV, V, K], q's dtype), stored by the recurrence as it walks,
    for a backward that then recomputes none: (o, final state, states)."""
    B, Tn, H, K, HV, V, seq_lens, N, tokens, stride, dev = sizes(q, v, seq_lens, cu_seqlens)
    assert supports(K, V) and v_tile in V_TILES

    o = torch.empty(B, Tn, HV, V, dtype=q.dtype, device=dev)
    h0 = None
    if initial_state is not None:
        h0 = flat(initial_state, N, HV, K * V, dtype=torch.float32)
    keep_final = output_final_state or checkpoints is not None
    ht = torch.empty(N, HV, K * V, dtype=torch.float32, device=dev) if keep_final else None
    if tokens == 0 or sum(seq_lens) == 0:
        if ht is not None:
            ht.copy_(h0) if h0 is not None else ht.zero_()
        out = o, _final(ht if output_final_state else None, N, HV, K, V, state_v_first)
        return out + (None,) if save_states else out

    ready(DTYPES[q.dtype])
    seqs, chunks = _tables(seq_lens, stride, dev)
    rows = (flat(q, tokens, H, K), flat(k, tokens, H, K), flat(v, tokens, HV, V))
    states = torch.empty(chunks.shape[0], HV, V, K, dtype=q.dtype, device=dev) if save_states else None
    with on_device(dev):
        ag, coef, _ = prepare(*rows[:2], g, beta, chunks, HV, scale, use_qk_l2norm_in_kernel)
        recur(*rows, ag, coef, _state_rows(seq_lens, stride, dev) if save_states else seqs, h0,
              o.view(tokens, HV, V), ht, state_v_first, v_tile, states)
        if checkpoints is not None:
            from .backward import _walk_table
            entering = torch.empty(chunks.shape[0], HV, V, K, dtype=q.dtype, device=dev)
            none = unused_rows(HV, K * V, torch.float32, dev)
            entry(recurrence_kernel(DTYPES[q.dtype], 128, save_states=True))(
                *rows, ag, coef, _walk_table(seq_lens, stride, dev), h0 if h0 is not None else none, rows[2], none,
                entering, int(h0 is not None), 0, int(bool(state_v_first)))
            checkpoints.store_entering(entering, _final(ht, N, HV, K, V, state_v_first), seq_lens, state_v_first)
    out = o, _final(ht if output_final_state else None, N, HV, K, V, state_v_first)
    return out + (states,) if save_states else out


class Sizes(NamedTuple):
    """A call's sizes as the launchers use them (``sizes``)."""
    B: int
    T: int
    H: int
    K: int
    HV: int
    V: int
    seq_lens: tuple[int, ...]
    N: int
    tokens: int
    stride: int | None          # batched layout: sequence n starts at n * stride; None = packed
    device: torch.device


def sizes(q, v, seq_lens, cu_seqlens) -> Sizes:
    """``Sizes`` of a call on [B, T, heads, dim] q and v; ``seq_lens`` None = B sequences of T."""
    B, Tn, H, K = q.shape
    seq_lens = (Tn,) * B if seq_lens is None else tuple(seq_lens)
    return Sizes(B, Tn, H, K, v.shape[2], v.shape[3], seq_lens, len(seq_lens), B * Tn,
                 Tn if cu_seqlens is None else None, q.device)


def flat(x: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` as a contiguous ``shape`` (and ``dtype``), running no torch op that would not change it:
    each one costs the host several microseconds per call (``scripts/host_profile.py``)."""
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if not x.is_contiguous():
        x = x.contiguous()
    return x if x.shape == shape else x.view(shape)


def _grid_rows(t: torch.Tensor, start: int) -> torch.Tensor:
    """The rows of one launch, from ``start``: the whole table unless it needs several launches."""
    return t if start == 0 and t.shape[0] <= MAX_GRID_Z else t[start:start + MAX_GRID_Z]


def prepare(q, k, g, beta, chunks, HV: int, scale: float, l2norm: bool, heads_per_cta: int | None = None,
            a0g: torch.Tensor | None = None):
    """Kernel 1 on flat [tokens, heads, dim] inputs: ag [tokens, HV, 64] and the row factors
    coef [HV, tokens, 8] for every chunk and value head, and the per-chunk statistics [num_chunks, HV, 2]
    context parallelism's truncation test reads. ``heads_per_cta`` (a divisor of the GVA group):
    value heads per CTA; None = the planner's choice for this grid. ``a0g``: where given
    ([tokens, HV, 64], q's dtype), also the gated inverse Gamma * A0 the backward needs."""
    tokens = q.shape[0]
    if heads_per_cta is None:
        heads_per_cta = prep_heads_per_cta(chunks.shape[0], q.shape[1], HV, sm_count(q.device))
    assert (HV // q.shape[1]) % heads_per_cta == 0, "heads_per_cta must divide the GVA group"
    ag = torch.empty(tokens, HV, CHUNK, dtype=q.dtype, device=q.device)
    coef = torch.empty(HV, tokens, COEFS, dtype=torch.float32, device=q.device)
    stats = torch.empty(chunks.shape[0], HV, 2, dtype=torch.float32, device=q.device)
    kernel = entry(matrices_kernel(DTYPES[q.dtype]))
    g, beta = (flat(x, tokens, HV, dtype=torch.float32) for x in (g, beta))
    for s in range(0, chunks.shape[0], MAX_GRID_Z):      # the grid's z extent is at most 65535
        kernel(q, k, g, beta, _grid_rows(chunks, s), ag, coef, _grid_rows(stats, s),
               a0g if a0g is not None else unused_rows(HV, CHUNK, q.dtype, q.device), float(scale),
               int(bool(l2norm)), heads_per_cta, int(a0g is not None))
    return ag, coef, stats


def recur(q, k, v, ag, coef, seqs, h0, o, ht, state_v_first: bool, v_tile: int, states=None):
    """Kernel 2 on flat inputs: writes o [tokens, HV, V] and, if given, the final states into the rows of
    ht [rows, HV, K * V] that ``seqs``' third column names (-1: not stored). ``states``: where given
    ([chunks, HV, V, K]), the state entering every chunk too, from the chunk that ``seqs``' fourth
    column names on."""
    HV, K, V = v.shape[1], q.shape[2], v.shape[2]
    placeholder = unused_rows(HV, K * V, torch.float32, q.device) if h0 is None or ht is None else None
    kernel = entry(recurrence_kernel(DTYPES[q.dtype], v_tile) if states is None else
                   recurrence_kernel(DTYPES[q.dtype], v_tile, save_states=True, output=True))
    flags = (int(h0 is not None), int(ht is not None), int(bool(state_v_first)))
    states = unused_states(HV, K, V, q.dtype, q.device) if states is None else states
    for s in range(0, seqs.shape[0], MAX_GRID_Z):        # the grid's z extent is at most 65535
        kernel(q, k, v, ag, coef, _grid_rows(seqs, s), _grid_rows(h0, s) if h0 is not None else placeholder, o,
               ht if ht is not None else placeholder, states, *flags)


@functools.lru_cache(maxsize=64)
def unused_rows(HV: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Stands in for an absent optional tensor (h0, ht, a0g, ...; its flag tells the kernel not to touch
    it): one per shape, not an allocation per call."""
    return torch.empty(1, HV, width, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def unused_states(HV: int, K: int, V: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``unused_rows`` for the per-chunk states of the backward's recompute."""
    return torch.empty(1, HV, V, K, dtype=dtype, device=device)


def warmup(q, k, v, ag, coef, spans, ends, v_tile: int):
    """The state-only variant over per-(segment, head) ``spans`` [S, HV, 4]: R of each span into
    ``ends[:S]``, M into ``ends[S:]`` ([2S, HV, K * K], K-major). q only fixes the shared signature."""
    assert spans.shape[0] <= MAX_GRID_Z and ends.shape[0] == 2 * spans.shape[0]
    kernel = entry(recurrence_kernel(DTYPES[q.dtype], v_tile, True))
    HV, K, V = v.shape[1], q.shape[2], v.shape[2]
    kernel(q, k, v, ag, coef, spans, ends, v, ends, unused_states(HV, K, V, q.dtype, q.device), 0, 1, 0)


def _final(ht, N, HV, K, V, state_v_first):
    if ht is None:
        return None
    return ht.view(N, HV, V, K) if state_v_first else ht.view(N, HV, K, V)
