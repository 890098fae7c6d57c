"""State checkpoints for prefix caching: the state every N tokens of each sequence, into a caller's buffer.

With ``checkpoint_every=N`` (a multiple of 64) and ``checkpoints=buffer``, the state after tokens N, 2N,
... of each sequence of the call (counted from the sequence's start in this call; the state after its
last token is the final state, not a checkpoint unless the length is a multiple of N) is stored in
the buffer's rows, sequence after sequence:

    row of sequence n's j-th checkpoint (after (j + 1) N tokens) = checkpoint_offsets(lengths, N)[n] + j

The buffer is ``[rows, HV, K, V]`` (``[rows, HV, V, K]`` with ``state_v_first``), float32, bfloat16 or
float16, with ``rows = checkpoint_offsets(lengths, N)[-1]``; states are rounded once on store.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

import torch

from .inputs import host_table

CHUNK = 64
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def checkpoint_offsets(lengths, every: int) -> list[int]:
    """First buffer row of each sequence's checkpoints, then the total: ``[0, r_0, r_0 + r_1, ...]``.
    ``lengths``: the sequences' token counts (a list, or ``cu_seqlens`` on the host)."""
    if isinstance(lengths, torch.Tensor):
        offsets = lengths.tolist()
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    return [0, *accumulate(n // every for n in lengths)]


@dataclass(frozen=True)
class Checkpoints:
    buffer: torch.Tensor
    every: int

    @staticmethod
    def of(checkpoint_every, checkpoints) -> "Checkpoints | None":
        if checkpoint_every is None and checkpoints is None:
            return None
        if checkpoint_every is None or checkpoints is None:
            raise ValueError("`checkpoint_every` and `checkpoints`: pass both (the interval and the buffer) or neither")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every <= 0 \
                or checkpoint_every % CHUNK:
            raise ValueError(f"`checkpoint_every`: expected a positive multiple of {CHUNK}, got {checkpoint_every!r}")
        if not isinstance(checkpoints, torch.Tensor):
            raise TypeError(f"`checkpoints`: expected a torch.Tensor, got {type(checkpoints).__name__}")
        return Checkpoints(checkpoints, checkpoint_every)

    def check(self, problem, state_v_first: bool, device: torch.device) -> None:
        rows = checkpoint_offsets(problem.seq_lens, self.every)[-1]
        inner = (problem.v_heads, problem.v_dim, problem.k_dim) if state_v_first else \
            (problem.v_heads, problem.k_dim, problem.v_dim)
        layout = "[rows, HV, V, K]" if state_v_first else "[rows, HV, K, V]"
        if tuple(self.buffer.shape) != (rows, *inner):
            raise ValueError(f"`checkpoints`: expected shape {layout} = {(rows, *inner)} (rows: "
                             f"checkpoint_offsets(lengths, {self.every})[-1]), got {tuple(self.buffer.shape)}")
        if self.buffer.dtype not in DTYPES:
            raise TypeError(f"`checkpoints`: expected float32, bfloat16 or float16, got {self.buffer.dtype}")
        if self.buffer.device != device:
            raise ValueError(f"`checkpoints`: expected device {device} (q's), got {self.buffer.device}")

    def store(self, states: torch.Tensor, seq_lens: tuple[int, ...], state_v_first: bool) -> None:
        """``states``: ``[N, HV, NC, K, V]``, the state after each chunk of each sequence."""
        seq, chunk = _where(tuple(seq_lens), self.every, states.device)
        if seq.numel() == 0:
            return
        picked = states[seq, :, chunk]                              # [rows, HV, K, V]
        picked = picked.transpose(-1, -2) if state_v_first else picked
        self.buffer.copy_(picked)


    def store_entering(self, entering: torch.Tensor, final: torch.Tensor, seq_lens: tuple[int, ...],
                       state_v_first: bool) -> None:
        """The kernels' form: ``entering`` [chunks, HV, V, K], the state entering every chunk of every
        sequence in order (V-major, as ``chunk_recurrence[save_states]`` writes it), and ``final``, the
        final states (the call's layout). A checkpoint after token (j + 1) N is the state entering that
        chunk, or the final state where the sequence ends there."""
        rows_c, chunks, rows_f, seqs = _entering_rows(tuple(seq_lens), self.every, entering.device)
        if rows_c.numel():
            picked = entering[chunks]
            self.buffer[rows_c] = (picked if state_v_first else picked.transpose(-1, -2)).to(self.buffer.dtype)
        if rows_f.numel():
            self.buffer[rows_f] = final[seqs].to(self.buffer.dtype)


@lru_cache(maxsize=64)
def _entering_rows(seq_lens: tuple[int, ...], every: int, device: torch.device):
    """(buffer rows, chunk indices) of the checkpoints inside their sequence and (buffer rows, sequences)
    of those at its end."""
    rows_c, chunks, rows_f, seqs = [], [], [], []
    row, first_chunk = 0, 0
    for n, L in enumerate(seq_lens):
        for j in range(L // every):
            t = (j + 1) * every
            if t < L:
                rows_c.append(row)
                chunks.append(first_chunk + t // CHUNK)
            else:
                rows_f.append(row)
                seqs.append(n)
            row += 1
        first_chunk += -(-L // CHUNK)
    return tuple(host_table(x, torch.long, device) for x in (rows_c, chunks, rows_f, seqs))


@lru_cache(maxsize=64)
def _where(seq_lens: tuple[int, ...], every: int, device: torch.device):
    """(sequence, chunk) of every checkpoint row, in row order: chunk ``(j + 1) every / 64 - 1``."""
    step = every // CHUNK
    seq = [n for n, L in enumerate(seq_lens) for _ in range(L // every)]
    chunk = [(j + 1) * step - 1 for L in seq_lens for j in range(L // every)]
    return host_table(seq, torch.long, device), host_table(chunk, torch.long, device)
