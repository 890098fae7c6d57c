"""Input validation and sequence bookkeeping shared by every backend.

Everything here runs on the host and reads only shapes, dtypes and devices, except the one place
that must know the segment lengths of ``cu_seqlens`` (see ``sequence_lengths``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class Problem:
    """Shapes of one call, after validation."""

    batch: int          # B
    tokens: int         # T
    qk_heads: int       # H
    v_heads: int        # HV
    k_dim: int          # K
    v_dim: int          # V
    seq_lens: tuple[int, ...]   # per independent sequence (N of them), on the host

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def group(self) -> int:
        return self.v_heads // self.qk_heads


def _fail(name: str, expected: str, got) -> ValueError:
    return ValueError(f"`{name}`: expected {expected}, got {got}")


class _Meta(NamedTuple):
    """What validation reads of a tensor: checks run on this, so their result can be cached."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int:
        return len(self.shape)


def _check_tensor(name: str, x, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"`{name}`: expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != ndim:
        raise _fail(name, f"a {ndim}-D tensor", f"shape {tuple(x.shape)}")


# Lengths read from a device cu_seqlens are cached per tensor object and its version counter, so
# repeated calls with the same cu_seqlens -- the normal case inside a model -- synchronise once.
# Keyed by id() with a weak reference that must still resolve to the same object (a freed tensor's id
# can be reused by a new one): tensors compare elementwise, so they cannot be dict keys themselves.
_lengths_cache: dict[int, tuple[weakref.ref, int, tuple[int, ...]]] = {}


def sequence_lengths(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | None = None) -> tuple[int, ...]:
    """Per-sequence lengths on the host.

    Uses ``cu_seqlens_cpu`` when given (no synchronisation). Otherwise reads ``cu_seqlens`` -- one
    device-to-host copy for a CUDA tensor -- and caches the result for that tensor while its version
    counter says it was not modified in place. Inference tensors (made under ``torch.inference_mode``)
    have no version counter, so an in-place change could not be seen: they are read on every call.
    """
    if cu_seqlens_cpu is not None:
        return _diff(cu_seqlens_cpu.tolist())
    if cu_seqlens.is_inference():
        return _diff(cu_seqlens.tolist())
    key = id(cu_seqlens)
    hit = _lengths_cache.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    lens = _diff(cu_seqlens.tolist())

    def forget(ref, key=key):
        if _lengths_cache.get(key, (None,))[0] is ref:
            del _lengths_cache[key]
    _lengths_cache[key] = (weakref.ref(cu_seqlens, forget), cu_seqlens._version, lens)
    return lens


def sequence_starts(seq_lens: tuple[int, ...], batched_len: int | None) -> list[int]:
    """First token of each sequence on the flattened [B*T] token axis: n * T for a dense batch
    (``batched_len`` = T), else packed back to back (varlen)."""
    if batched_len is not None:
        return [n * batched_len for n in range(len(seq_lens))]
    return [0, *accumulate(seq_lens)][:-1]


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read from the device, as the planner's inputs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def host_table(rows, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small table built on the host, copied to ``device`` without waiting (from pinned memory)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _diff(offsets: list[int]) -> tuple[int, ...]:
    if not offsets or offsets[0] != 0:
        raise _fail("cu_seqlens", "offsets starting at 0", offsets[:4])
    lens = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if any(n < 0 for n in lens):
        raise _fail("cu_seqlens", "non-decreasing offsets", offsets)
    return lens


TENSOR_ARGS = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens", "cu_seqlens_cpu")


def validate(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, state_v_first: bool) -> Problem:
    """Check every argument and return the call's shapes; raise TypeError/ValueError naming the culprit.

    The checks of shapes, dtypes and devices run once per distinct combination of them (cached on a
    key of those attributes, which costs a quarter of the checks); the offsets are checked every call."""
    args = (q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu)
    for name, x in zip(TENSOR_ARGS, args):
        if not isinstance(x, torch.Tensor) and (x is not None or name in TENSOR_ARGS[:5]):
            raise TypeError(f"`{name}`: expected a torch.Tensor, got {type(x).__name__}")
    key = (_meta(q), _meta(k), _meta(v), _meta(g), _meta(beta), _meta(initial_state), _meta(cu_seqlens),
           _meta(cu_seqlens_cpu))
    B, T, H, HV, K, V = _check_metadata(key, state_v_first)

    if cu_seqlens is None:
        seq_lens = (T,) * B
    else:
        seq_lens = sequence_lengths(cu_seqlens, cu_seqlens_cpu)
        if sum(seq_lens) != T:
            raise _fail("cu_seqlens", f"a last offset equal to T={T}", sum(seq_lens))
    if initial_state is not None:
        want = (len(seq_lens), HV, V, K) if state_v_first else (len(seq_lens), HV, K, V)
        if initial_state.shape != want:
            layout = "[N, HV, V, K]" if state_v_first else "[N, HV, K, V]"
            raise _fail("initial_state", f"shape {layout} = {want}", f"shape {tuple(initial_state.shape)}")
    return Problem(B, T, H, HV, K, V, seq_lens)


def _meta(x):
    """A tensor's cache key part (a plain tuple: a NamedTuple costs more to build than the checks save)."""
    return None if x is None else (x.shape, x.dtype, x.device)


@lru_cache(maxsize=256)
def _check_metadata(key, state_v_first: bool) -> tuple[int, ...]:
    """Every check that reads only shapes, dtypes and devices: (B, T, H, HV, K, V)."""
    q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu = (None if m is None else _Meta(*m) for m in key)
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check_tensor("g", g, 3)
    _check_tensor("beta", beta, 3)
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise _fail("k", f"shape {(B, T, H, K)} like q [B, T, H, K]", f"shape {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (B, T):
        raise _fail("v", f"shape [B={B}, T={T}, HV, V]", f"shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV % H != 0:
        raise _fail("v", f"a number of value heads HV that is a multiple of H={H}", f"HV={HV}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, HV):
            raise _fail(name, f"shape [B, T, HV] = {(B, T, HV)}", f"shape {tuple(x.shape)}")
    devices = {x.device for x in (q, k, v, g, beta, initial_state, cu_seqlens) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if q.dtype != k.dtype:
        raise TypeError(f"`k`: expected the dtype of q ({q.dtype}), got {k.dtype}")
    if cu_seqlens is not None:
        _check_tensor("cu_seqlens", cu_seqlens, 1, INDEX_DTYPES)
        if B != 1:
            raise _fail("q", "batch size 1 when cu_seqlens is given (flatten the sequences)", f"B={B}")
        if cu_seqlens.shape[0] < 2:
            raise _fail("cu_seqlens", "at least 2 offsets [0, ..., T]", f"{cu_seqlens.shape[0]} values")
        if cu_seqlens_cpu is not None:
            _check_tensor("cu_seqlens_cpu", cu_seqlens_cpu, 1, INDEX_DTYPES)
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
    return B, T, H, HV, K, V
