"""The chunked gated delta rule in PyTorch (DESIGN section 2).

This is both the fallback for devices without a fast kernel and the executable specification the
Hopper kernels follow: the same gate-free inverse ``A0``, the same re-application of the gates, the
same reassociated new values ``V'``. It is vectorised over sequences, heads and chunks; only the
chunk-to-chunk recurrence is a Python loop. Autograd differentiates it end to end.

Tensors inside this module use the chunk layout ``[*batch, NC, C, D]`` (``[*batch, NC, C]`` for the
per-token gate and beta), where ``*batch`` is any number of leading dims (sequences, value heads,
segments). Padding tokens are zeros: with k = v = 0 and g = beta = 0 a token leaves the state alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .inputs import Problem, sequence_starts
from .naive import l2norm

CHUNK = 64


# ---------------------------------------------------------------------------------------------
# Per-chunk, state-independent pieces
# ---------------------------------------------------------------------------------------------
def gate_free_inverse(k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``A0 = (I + StrictLower(diag(beta) K K^T))^-1`` per chunk: unit lower triangular, no gates."""
    C = k.shape[-2]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    kkt = (beta[..., :, None] * k) @ k.transpose(-1, -2)
    system = torch.tril(kkt, diagonal=-1) + eye
    return torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)


def chunk_log_decay(g: torch.Tensor) -> torch.Tensor:
    """``gamma = cumsum(g)`` over each chunk, summed in float64. At strong decays (g down to -30 a
    token) gamma reaches about -2000, where float32 keeps the differences gamma_i - gamma_j that every
    gate is made of only to about 1e-4: that was the dominant error of dg, and through it of A_log's
    and dt_bias's gradients (0.1-0.5 rel-RMS at transformers' random init, now about 1e-5). The gates
    are formed in float64 and rounded once to the compute dtype; autograd's reverse sum for dg runs
    in float64 too."""
    return g.double().cumsum(-1)


def _to_chunk_end(gamma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp(gamma_C - gamma_i)``: each token's decay to the end of its chunk."""
    return (gamma[..., -1:] - gamma).exp().to(dtype)


def decay_mask(gamma: torch.Tensor) -> torch.Tensor:
    """``Gamma_ij = exp(gamma_i - gamma_j)`` for i >= j, else 0. Exponents are <= 0: no overflow."""
    C = gamma.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool, device=gamma.device).tril()
    diff = gamma[..., :, None] - gamma[..., None, :]
    return diff.masked_fill(~lower, float("-inf")).exp()


def state_update_weights(k: torch.Tensor, beta: torch.Tensor, A0: torch.Tensor) -> torch.Tensor:
    """``X = -diag(beta) A0^T K`` of the state-only pass: S_next = e^{g_C} S + X^T (e^{g_C} K S - e^{g_C - g} V)."""
    return -beta[..., :, None] * (A0.transpose(-1, -2) @ k)


# ---------------------------------------------------------------------------------------------
# Recurrences over chunks
# ---------------------------------------------------------------------------------------------
def chunk_forward(q, k, v, g, beta, scale: float, h0=None, keep_states: bool = False):
    """Outputs and final state. q, k ``[*, NC, C, K]``; v ``[*, NC, C, V]``; g, beta ``[*, NC, C]``;
    h0 ``[*, K, V]`` or None. Returns o ``[*, NC, C, V]`` and S ``[*, K, V]``; with ``keep_states``
    also the state after every chunk, ``[*, NC, K, V]``."""
    gamma = chunk_log_decay(g)
    A0 = gate_free_inverse(k, beta)
    gates = decay_mask(gamma).to(k.dtype)
    Ag = gates * A0 * beta[..., None, :]                           # (Gamma . A0) diag(beta)
    P = gates * (q @ k.transpose(-1, -2))                          # Gamma . Lower(Q K^T)
    e_gamma = gamma.exp().to(k.dtype)[..., None]
    k_in, q_in = e_gamma * k, (scale * e_gamma) * q
    k_out = _to_chunk_end(gamma, k.dtype)[..., None] * k          # decays each token to the chunk end
    decay_last = gamma[..., -1].exp().to(k.dtype)[..., None, None]

    S = _initial(h0, k, v)
    outputs, states = [], []
    for c in range(k.shape[-3]):
        v_new = Ag[..., c, :, :] @ (v[..., c, :, :] - k_in[..., c, :, :] @ S)
        outputs.append(q_in[..., c, :, :] @ S + scale * (P[..., c, :, :] @ v_new))
        S = decay_last[..., c, :, :] * S + k_out[..., c, :, :].transpose(-1, -2) @ v_new
        if keep_states:
            states.append(S)
    o = torch.stack(outputs, dim=-3) if outputs else v.new_zeros(v.shape)
    if keep_states:
        return o, S, (torch.stack(states, dim=-3) if states else S.new_zeros(*S.shape[:-2], 0, *S.shape[-2:]))
    return o, S


def chunk_states(k, v, g, beta, h0=None):
    """State-only pass: the state after the last chunk, without outputs (CP warm-up, backward)."""
    gamma = chunk_log_decay(g)
    X = state_update_weights(k, beta, gate_free_inverse(k, beta))
    decay_last = gamma[..., -1].exp().to(k.dtype)[..., None, None]
    v_out = _to_chunk_end(gamma, k.dtype)[..., None] * v
    S = _initial(h0, k, v)
    for c in range(k.shape[-3]):
        e_c = decay_last[..., c, :, :]
        S = e_c * S + X[..., c, :, :].transpose(-1, -2) @ (e_c * (k[..., c, :, :] @ S) - v_out[..., c, :, :])
    return S


def chunk_transitions(k, g, beta):
    """Per-chunk transition matrices ``M_c = e^{g_C} (I + X^T K)`` (``[*, NC, K, K]``): S_next = M_c S + R_c."""
    gamma = chunk_log_decay(g)
    X = state_update_weights(k, beta, gate_free_inverse(k, beta))
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return gamma[..., -1].exp().to(k.dtype)[..., None, None] * (eye + X.transpose(-1, -2) @ k)


def _initial(h0, k, v):
    if h0 is not None:
        return h0
    return k.new_zeros(*k.shape[:-3], k.shape[-1], v.shape[-1])


# ---------------------------------------------------------------------------------------------
# Between the user's [B, T, H, D] tensors and the chunk layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkLayout:
    """Where each (sequence, chunk, row) of the chunk layout reads its token from.

    ``source`` indexes the flattened ``[B*T]`` token axis, with ``B*T`` meaning "padding" (a zero row
    appended before gathering); ``valid`` lists, in token order, the chunk-layout rows that hold
    real tokens, so scattering back is one index select.
    """

    source: torch.Tensor     # [N, NC * C] int64
    valid: torch.Tensor      # [B*T] int64, positions in the flattened [N * NC * C] rows
    num_chunks: int

    @staticmethod
    @lru_cache(maxsize=64)
    def build(seq_lens: tuple[int, ...], batched_len: int | None, device: torch.device) -> "ChunkLayout":
        num_chunks = max([-(-n // CHUNK) for n in seq_lens] + [0])
        width = num_chunks * CHUNK
        pos = torch.arange(width)
        lens = torch.tensor(seq_lens, dtype=torch.long)
        starts = torch.tensor(sequence_starts(seq_lens, batched_len), dtype=torch.long)
        total = int(lens.sum()) if batched_len is None else batched_len * len(seq_lens)
        inside = pos[None, :] < lens[:, None]
        source = torch.where(inside, starts[:, None] + pos[None, :], torch.full_like(inside, total, dtype=torch.long))
        valid = inside.reshape(-1).nonzero().squeeze(1)
        return ChunkLayout(source.to(device), valid.to(device), num_chunks)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, HV, *D]`` -> ``[N, HV, NC, C, *D]`` (zero padding)."""
        flat = x.reshape(-1, *x.shape[2:])
        flat = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        y = flat[self.source]                                      # [N, NC*C, HV, *D]
        y = y.reshape(y.shape[0], self.num_chunks, CHUNK, *y.shape[2:])
        return y.movedim(3, 1)

    def scatter(self, y: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """``[N, HV, NC, C, D]`` -> ``[B, T, HV, D]``, dropping padding rows."""
        rows = y.movedim(1, 3).reshape(-1, y.shape[1], y.shape[-1])
        return rows[self.valid].reshape(batch, tokens, y.shape[1], y.shape[-1])


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def chunked_gated_delta_rule(q, k, v, g, beta, scale: float, initial_state, output_final_state: bool,
                             use_qk_l2norm_in_kernel: bool, problem: Problem, batched: bool,
                             state_v_first: bool, segment_chunks: int | None = None,
                             truncate_below: float | None = None, checkpoints=None):
    """The torch path of ``chunk_gated_delta_rule`` on validated inputs.

    ``segment_chunks`` runs it as context parallelism would (segments of that many chunks, exact
    scan of segment states); ``truncate_below`` additionally applies the gate-driven truncation
    with threshold tau (see ``context_parallel``). Returns o in q's dtype and the final state in
    float32 (float64 when the inputs are float64). ``checkpoints``: a ``checkpoints.Checkpoints`` to
    store the states into (unsplit only).
    """
    from .context_parallel import segmented_forward

    out_dtype, dtype = q.dtype, compute_dtype(q, k, v)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(problem.group, dim=2)
    k = k.repeat_interleave(problem.group, dim=2)

    layout = ChunkLayout.build(problem.seq_lens, problem.tokens if batched else None, q.device)
    qc, kc, vc = layout.gather(q), layout.gather(k), layout.gather(v)
    gc, bc = layout.gather(g), layout.gather(beta)

    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(dtype)
        h0 = h0.transpose(-1, -2) if state_v_first else h0
    if checkpoints is not None:
        assert segment_chunks is None, "checkpoints are taken on the unsplit walk"
        oc, S, states = chunk_forward(qc, kc, vc, gc, bc, scale, h0, keep_states=True)
        checkpoints.store(states, problem.seq_lens, state_v_first)
    elif segment_chunks is None:
        oc, S = chunk_forward(qc, kc, vc, gc, bc, scale, h0)
    else:
        oc, S = segmented_forward(qc, kc, vc, gc, bc, scale, h0, segment_chunks, truncate_below)

    o = layout.scatter(oc, problem.batch, problem.tokens).to(out_dtype)
    final = None
    if output_final_state:
        final = S.transpose(-1, -2) if state_v_first else S
        final = final.contiguous()
    return o, final
