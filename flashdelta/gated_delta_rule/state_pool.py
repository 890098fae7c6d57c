"""State pools: the per-slot recurrent states a server keeps between calls, read and written in place.

A pool is ``[slots, HV, K, V]`` (``[slots, HV, V, K]`` with ``state_v_first``, as vLLM and SGLang keep
it) in float32, bfloat16 or float16; its rows may be strided (a view into a larger cache), each row
itself contiguous. A call names the slots its sequences use with ``state_indices``:

- ``[N]``: sequence n starts from ``pool[idx[n]]`` and its final state is written back there;
- ``[N, S]`` (the decode entry's speculative verify): sequence n starts from
  ``pool[idx[n, a_n - 1]]`` (``a_n = num_accepted_tokens[n]``, 1 when not given) and the state after
  its token t is written to ``pool[idx[n, t]]``, for every t it has;

and a slot of ``-1`` means "start from zero" (reading) or "store nothing" (writing): padding.
States are computed in float32 (float64 for float64 inputs) and rounded once, on store.

Reads and writes here are the PyTorch path's; the kernels index the pool themselves. Neither
synchronises with the device: ``write_states`` stores through one ``index_copy_`` whose skipped rows
rewrite a value some row writes anyway (see there), so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import weakref

import torch

from .inputs import INDEX_DTYPES

POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_pool(pool, state_indices, num_seqs: int, HV: int, K: int, V: int, state_v_first: bool,
               device: torch.device, steps: int | None = None) -> None:
    """Shapes, dtypes and devices of a pool and its indices; ``steps``: the most tokens of a sequence,
    where 2-D (per-step) indices are allowed (they need a column per token), else None. Raises
    TypeError/ValueError."""
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"`initial_state`: with `state_indices`, expected the state pool (a torch.Tensor), "
                        f"got {type(pool).__name__}")
    if not isinstance(state_indices, torch.Tensor):
        raise TypeError(f"`state_indices`: expected a torch.Tensor, got {type(state_indices).__name__}")
    layout = "[slots, HV, V, K]" if state_v_first else "[slots, HV, K, V]"
    inner = (HV, V, K) if state_v_first else (HV, K, V)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != inner:
        raise ValueError(f"`initial_state`: expected a state pool {layout} = [slots, {', '.join(map(str, inner))}], "
                         f"got shape {tuple(pool.shape)}")
    if pool.dtype not in POOL_DTYPES:
        raise TypeError(f"`initial_state`: expected a pool of float32, bfloat16 or float16, got {pool.dtype}")
    if pool.device != device or state_indices.device != device:
        raise ValueError(f"`initial_state` / `state_indices`: expected device {device} (q's), got "
                         f"{pool.device} and {state_indices.device}")
    if pool.shape[0] and tuple(pool[0].stride()) != (inner[1] * inner[2], inner[2], 1):
        raise ValueError("`initial_state`: each row of the state pool must be contiguous (rows may be strided)")
    if pool.requires_grad and torch.is_grad_enabled():
        raise ValueError("`initial_state`: a state pool is updated in place and cannot require grad")
    if state_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"`state_indices`: expected int32 or int64, got {state_indices.dtype}")
    shapes = f"[N={num_seqs}]" + (f" or [N={num_seqs}, steps >= tokens per sequence]" if steps is not None else "")
    ok = (state_indices.dim() == 1 or (steps is not None and state_indices.dim() == 2)) \
        and state_indices.shape[0] == num_seqs
    if not ok:
        raise ValueError(f"`state_indices`: expected shape {shapes}, got {tuple(state_indices.shape)}")
    if state_indices.dim() == 2 and state_indices.shape[1] < steps:
        raise ValueError(f"`state_indices`: expected one slot per token, at least {steps} columns, "
                         f"got shape {tuple(state_indices.shape)}")


# Checked values are cached per index tensor and version, as sequence lengths are (``inputs``).
_checked: dict[int, tuple[weakref.ref, int, int]] = {}


def check_slots(state_indices: torch.Tensor, slots: int, tokens_per_seq=None, num_accepted_tokens=None) -> None:
    """The slot values: each in [-1, slots), and no slot written twice by one call (two sequences,
    or two steps, storing into one slot would race). ``tokens_per_seq``: per-sequence token counts
    for 2-D indices (only the first that many columns of a row are written); ``num_accepted_tokens``:
    each in [1, columns].

    Reading the values synchronises with the device once per index tensor and version; it is skipped
    while a CUDA graph is captured (there is nothing to read yet) and repeated on every call for an
    inference tensor (no version counter). The kernels never touch a slot outside the pool, whatever
    the values."""
    if state_indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    inference = state_indices.is_inference()
    key = id(state_indices)
    hit = _checked.get(key)
    if not inference and hit is not None and hit[0]() is state_indices and hit[1] == state_indices._version \
            and hit[2] == slots and tokens_per_seq is None:
        return
    if num_accepted_tokens is not None:
        accepted = num_accepted_tokens.tolist()
        bad = [a for a in accepted if not 1 <= a <= state_indices.shape[1]]
        if bad:
            raise ValueError(f"`num_accepted_tokens`: expected values in [1, {state_indices.shape[1]}] "
                             f"(columns of `state_indices`), got {bad[0]}")
    rows = state_indices.tolist()
    rows = [[r] for r in rows] if state_indices.dim() == 1 else rows
    written = []
    for n, row in enumerate(rows):
        bad = [r for r in row if not -1 <= r < slots]
        if bad:
            raise ValueError(f"`state_indices`: slot {bad[0]} is outside the pool's {slots} slots (-1 = none)")
        width = len(row) if tokens_per_seq is None else min(len(row), tokens_per_seq[n])
        written += [r for r in row[:width] if r >= 0]
    if len(set(written)) != len(written):
        dup = next(r for r in written if written.count(r) > 1)
        raise ValueError(f"`state_indices`: slot {dup} is written more than once by this call (the stores would race)")
    if not inference and tokens_per_seq is None:
        def forget(ref, key=key):
            if _checked.get(key, (None,))[0] is ref:
                del _checked[key]
        _checked[key] = (weakref.ref(state_indices, forget), state_indices._version, slots)


def read_states(pool: torch.Tensor, rows: torch.Tensor, state_v_first: bool, dtype: torch.dtype) -> torch.Tensor:
    """``pool[rows]`` in ``dtype``, rows of -1 read as zeros: K-major (``[N, HV, K, V]``) where
    ``state_v_first`` says the pool is V-major, else in the pool's own layout. One gather and one
    in-place mask (and a conversion where the dtypes differ)."""
    states = pool[rows.clamp(min=0)]
    if states.dtype != dtype:
        states = states.to(dtype)
    states.masked_fill_((rows < 0)[:, None, None, None], 0)
    return states.transpose(-1, -2) if state_v_first else states


def write_states(pool: torch.Tensor, rows: torch.Tensor, states: torch.Tensor, state_v_first: bool) -> None:
    """``pool[rows] = states`` (K-major ``[N, HV, K, V]`` where ``state_v_first`` says the pool is
    V-major, else in its layout; rounded to the pool's dtype) in place, rows of -1 skipped, without a
    host synchronisation.

    A skipped row cannot be dropped without knowing which rows are skipped (a host read), so it is sent
    to the slot of the first stored row, with that row's value: duplicate indices of index_copy_ then
    carry equal values and the result does not depend on their order. With no row stored at all, every
    row goes to slot 0 with slot 0's own value (the one select below)."""
    if rows.numel() == 0 or pool.shape[0] == 0:
        return
    states = states.transpose(-1, -2) if state_v_first else states
    valid = rows >= 0
    first = valid.to(torch.int8).argmax()                         # the first stored row (0 if none)
    source = torch.where(valid, torch.arange(rows.shape[0], device=rows.device), first)
    target = rows[source].clamp(min=0).long()
    values = torch.where(valid.any(), states[source].to(pool.dtype), pool[:1])
    pool.index_copy_(0, target, values)
