"""Context parallelism inside one device (DESIGN section 3), as PyTorch.

A sequence of NC chunks is cut into segments of L chunks. Three steps:

1. per segment, in parallel: R_j, the state reached from zero over segment j, and -- where needed --
   its transition matrix M_j (the product of the chunk transitions);
2. a short scan over segments: S_{j+1} = M_j S_j + R_j, S_0 = h0;
3. per segment, in parallel: the output pass started from S_j.

Gate-driven truncation: each token's map e^g (I - beta k k^T) has spectral norm <= e^g when
0 <= beta |k|^2 <= 2, so ||M_j||_2 <= exp(G_j) with G_j the sum of g over segment j. Where
G_j <= -tau and the condition holds for every token of the segment, the scan drops M_j S_j and
uses S_{j+1} = R_j. That injects an error of exactly -M_j S_j into S_{j+1}, bounded by
exp(G_j) ||S_j||_F; later exact steps are contractions (they never amplify it) and a later
truncation replaces it. Hence, per head,

    ||S_hat_j - S_j||_F <= max over truncated i < j of exp(G_i) ||S_i||_F      (``truncation_bound``)

With tau = TRUNCATION_TAU = 12 that is below 6.2e-6 of the state's norm: far below bf16 rounding.
Heads with g = 0 never truncate and always take the exact M.

The backward (DESIGN section 7) is the same scan run backwards with M^T: the gradient of the state
entering segment j is dS_j = M_j^T dS'_j + G_j, with dS'_j the gradient of the state leaving it (that
entering segment j + 1, or the final state's) and G_j the segment's own term from a zero end
gradient. ``segmented_state_gradient_walk`` computes G_j per segment in parallel, scans, then reruns
each segment from its corrected end gradient. ||M_j^T||_2 = ||M_j||_2 <= exp(G_j) again, so the same
rule drops M_j^T dS'_j with the same bound, on the gradients' norms.
"""
from __future__ import annotations

import torch

from .chunked import chunk_forward, chunk_states, chunk_transitions
from .chunked_backward import state_gradient_walk

TRUNCATION_TAU = 12.0


def _split(x: torch.Tensor, seg: int, token_dims: int) -> torch.Tensor:
    """``[*, NC, C, ...]`` -> ``[*, NS, L, C, ...]``, padding NC with identity (all-zero) chunks."""
    nc_dim = x.dim() - token_dims - 1
    nc = x.shape[nc_dim]
    pad = (-nc) % seg
    if pad:
        shape = list(x.shape)
        shape[nc_dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=nc_dim)
    return x.unflatten(nc_dim, (x.shape[nc_dim] // seg, seg))


def segment_summaries(k, v, g, beta, seg: int):
    """Per segment: R (state from zero), M (transition) and G (summed log-decay), plus whether the
    norm condition 0 <= beta |k|^2 <= 2 holds on every token. Inputs in chunk layout."""
    R = chunk_states(_split(k, seg, 2), _split(v, seg, 2), _split(g, seg, 1), _split(beta, seg, 1))
    return (R, *segment_transitions(k, g, beta, seg))


def segment_transitions(k, g, beta, seg: int):
    """Per segment: M (the product of its chunk transitions, ``[*, NS, K, K]``), G (summed log-decay)
    and whether 0 <= beta |k|^2 <= 2 holds on every token."""
    ks, gs, bs = _split(k, seg, 2), _split(g, seg, 1), _split(beta, seg, 1)
    M_chunks = chunk_transitions(ks, gs, bs)                           # [*, NS, L, K, K]
    M = M_chunks[..., 0, :, :]
    for c in range(1, seg):
        M = M_chunks[..., c, :, :] @ M
    G = gs.sum(dim=(-1, -2))                                           # [*, NS]
    bk = bs * (ks * ks).sum(-1)
    contractive = ((bk >= 0) & (bk <= 2)).all(-1).all(-1)
    return M, G, contractive


def scan_segments(R, M, h0, truncate):
    """``S_{j+1} = M_j S_j + R_j`` (``M_j S_j`` dropped where ``truncate``). Returns the states entering
    each segment ``[*, NS, K, V]`` and the state after the last."""
    S = h0 if h0 is not None else torch.zeros_like(R[..., 0, :, :])
    starts = []
    for j in range(R.shape[-3]):
        starts.append(S)
        carried = M[..., j, :, :] @ S
        if truncate is not None:
            carried = torch.where(truncate[..., j, None, None], torch.zeros_like(carried), carried)
        S = carried + R[..., j, :, :]
    return torch.stack(starts, dim=-3), S


def truncation_mask(G, contractive, tau: float):
    return (G <= -tau) & contractive


def truncation_bound(G, truncate, exact_starts):
    """Per segment, the bound on ||S_hat_j - S_j||_F above (zero where nothing was truncated yet)."""
    injected = torch.where(truncate, G.exp() * exact_starts.flatten(-2).norm(dim=-1), torch.zeros_like(G))
    running = torch.cummax(injected, dim=-1).values
    return torch.cat([torch.zeros_like(running[..., :1]), running[..., :-1]], dim=-1)


def segment_start_states(k, v, g, beta, h0, seg: int, tau: float | None = None):
    """States entering each segment and the final state; exact unless ``tau`` enables truncation."""
    R, M, G, contractive = segment_summaries(k, v, g, beta, seg)
    truncate = None if tau is None else truncation_mask(G, contractive, tau)
    return scan_segments(R, M, h0, truncate)


def segmented_forward(q, k, v, g, beta, scale: float, h0, seg: int, tau: float | None = None):
    """``chunk_forward`` computed as context parallelism does it: same inputs and results."""
    nc = k.shape[-3]
    starts, _ = segment_start_states(k, v, g, beta, h0, seg, tau)
    pieces = [_split(x, seg, 2) for x in (q, k, v)] + [_split(x, seg, 1) for x in (g, beta)]
    o, S = chunk_forward(*pieces, scale, starts)                      # one pass per segment, in parallel
    o = o.flatten(-4, -3)[..., :nc, :, :]
    return o, S[..., -1, :, :]


def segmented_state_gradient_walk(q, k, g, beta, scale: float, do, dht, seg: int, tau: float | None = None):
    """``chunked_backward.state_gradient_walk`` computed as backward context parallelism does it:
    same inputs and results (dS' per chunk, dv, dh0); exact unless ``tau`` enables truncation."""
    nc = k.shape[-3]
    pieces = [_split(x, seg, 2) for x in (q, k)] + [_split(x, seg, 1) for x in (g, beta)]
    do_s = _split(do, seg, 2)
    _, _, local = state_gradient_walk(*pieces, scale, do_s, None)     # G_j: zero end gradient, in parallel
    M, G, contractive = segment_transitions(k, g, beta, seg)
    truncate = None if tau is None else truncation_mask(G, contractive, tau)
    flip = lambda x: x.flip(-3)                                        # noqa: E731  (segments last to first)
    ends, dh0 = scan_segments(flip(local), flip(M.transpose(-1, -2)), dht,
                              None if truncate is None else truncate.flip(-1))
    d_out, dv, _ = state_gradient_walk(*pieces, scale, do_s, flip(ends))    # corrected pass, in parallel
    return d_out.flatten(-4, -3)[..., :nc, :, :], dv.flatten(-4, -3)[..., :nc, :, :], dh0
