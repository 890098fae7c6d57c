"""The backward of the chunked gated delta rule in PyTorch, stage by stage (DESIGN section 7).

The executable specification of the Hopper backward: each stage here is one kernel there, with the
same inputs and outputs, so a kernel is tested against its stage. Autograd of ``chunked.py`` gives the
same gradients (tests check it in float64); this form exists because it is the algorithm.

Per chunk, with Q~ = scale Q, b = e^gamma, b_C its last entry, Gamma the decay mask,
``A0g = Gamma * A0`` (FLA's gated inverse: ``A0g = Lg^-1``, ``Lg = I + StrictLower(diag(beta) Gamma * K K^T)``)
and ``Ag = A0g diag(beta)``:

1. ``chunk_entry_states``: the state S entering every chunk (the forward's recurrence, states kept);
2. ``state_gradient_walk``: chunks last to first, the gradient dS' of the state leaving each chunk,
   dV' = P^T dO + diag(b_C/b) K dS', dv = dU = Ag^T dV', dS = b_C dS' + Q~^T diag(b) dO - K^T diag(b) dU;
   it needs no forward state;
3. ``chunk_local_gradients``: every chunk at once from S, dS', dO and dv: dq, dk, dbeta, dg.

The gate's gradient: each e^gamma factor adds its term's product with its gradient to dgamma (+ for
e^gamma_i, - for e^-gamma_j); ``dg`` is the reverse cumulative sum of ``dgamma`` inside the chunk.
"""
from __future__ import annotations

import torch

from .chunked import ChunkLayout, compute_dtype, decay_mask, gate_free_inverse
from .inputs import Problem


def chunk_entry_states(k, v, g, beta, h0=None):
    """Stage 1: the state entering each chunk ``[*, NC, K, V]`` (chunk layout inputs)."""
    gamma = g.cumsum(-1)
    Ag = decay_mask(gamma) * gate_free_inverse(k, beta) * beta[..., None, :]
    b = gamma.exp()[..., None]
    b_C = gamma[..., -1].exp()[..., None, None]
    k_out = (gamma[..., -1:] - gamma).exp()[..., None] * k
    S = h0 if h0 is not None else k.new_zeros(*k.shape[:-3], k.shape[-1], v.shape[-1])
    states = []
    for c in range(k.shape[-3]):
        states.append(S)
        v_new = Ag[..., c, :, :] @ (v[..., c, :, :] - b[..., c, :, :] * (k[..., c, :, :] @ S))
        S = b_C[..., c, :, :] * S + k_out[..., c, :, :].transpose(-1, -2) @ v_new
    return torch.stack(states, dim=-3)


def state_gradient_walk(q, k, g, beta, scale: float, do, dht=None):
    """Stage 2: (dS' per chunk ``[*, NC, K, V]``, dv ``[*, NC, C, V]``, dh0 ``[*, K, V]``)."""
    gamma = g.cumsum(-1)
    gates = decay_mask(gamma)
    Ag = gates * gate_free_inverse(k, beta) * beta[..., None, :]
    P = gates * ((scale * q) @ k.transpose(-1, -2))
    b = gamma.exp()[..., None]
    b_C = gamma[..., -1].exp()[..., None, None]
    k_out = (gamma[..., -1:] - gamma).exp()[..., None] * k
    dS = dht if dht is not None else k.new_zeros(*k.shape[:-3], k.shape[-1], do.shape[-1])
    d_out, dv = [None] * k.shape[-3], [None] * k.shape[-3]
    for c in reversed(range(k.shape[-3])):
        d_out[c] = dS
        dv_new = P[..., c, :, :].transpose(-1, -2) @ do[..., c, :, :] + k_out[..., c, :, :] @ dS
        dv[c] = Ag[..., c, :, :].transpose(-1, -2) @ dv_new
        dS = (b_C[..., c, :, :] * dS + (scale * b[..., c, :, :] * q[..., c, :, :]).transpose(-1, -2) @ do[..., c, :, :]
              - (b[..., c, :, :] * k[..., c, :, :]).transpose(-1, -2) @ dv[c])
    if not d_out:
        return dS.new_zeros(*dS.shape[:-2], 0, *dS.shape[-2:]), do.new_zeros(do.shape), dS
    return torch.stack(d_out, dim=-3), torch.stack(dv, dim=-3), dS


def chunk_local_gradients(q, k, v, g, beta, scale: float, S, dS_out, do, dv):
    """Stage 3, every chunk independently: (dq, dk, dbeta, dg), chunk layout; q, k as the recurrence
    sees them (after the l2-norm), S / dS' from stages 1 / 2."""
    gamma = g.cumsum(-1)
    gates = decay_mask(gamma)
    A0g = gates * gate_free_inverse(k, beta)
    Ag = A0g * beta[..., None, :]
    b = gamma.exp()[..., None]
    to_end = (gamma[..., -1:] - gamma).exp()[..., None]             # b_C / b
    qs = scale * q
    St, dSt = S.transpose(-1, -2), dS_out.transpose(-1, -2)
    mT = lambda x: x.transpose(-1, -2)

    U = v - b * (k @ S)
    v_new = Ag @ U
    qk = qs @ mT(k)
    dv_new = mT(gates * qk) @ do + to_end * (k @ dS_out)
    do_S = b * (do @ St)                                             # d(Q~) through the state term
    dP = gates * (do @ mT(v_new))                                    # lower part of dO V'^T, gated
    v_dS = to_end * (v_new @ dSt)                                    # d(K) through the state update
    du_S = -b * (dv @ St)                                            # d(K) through U
    dqs = do_S + dP @ k
    dk = mT(dP) @ qs + v_dS + du_S

    # through Ag = A0g diag(beta), A0g = Lg^-1
    dAg = dv_new @ mT(U)
    dbeta = (dAg * A0g).sum(-2)
    strict = torch.ones_like(gates, dtype=torch.bool).tril(-1)
    Y = (dAg * beta[..., None, :]).masked_fill(~strict, 0)
    dLg = -(mT(A0g) @ Y @ mT(A0g)).masked_fill(~strict, 0)
    gated_kk = gates * (k @ mT(k))
    dbeta = dbeta + (dLg * gated_kk).sum(-1)
    H = dLg * gates * beta[..., :, None]
    dk = dk + H @ k + mT(H) @ k

    F = dP * qk                                                      # dP * P
    R = dLg * gated_kk * beta[..., :, None]                          # dLg * Lg
    state_in = (k * v_dS).sum(-1)
    dgamma = ((qs * do_S).sum(-1) + (k * du_S).sum(-1) - state_in
              + F.sum(-1) - F.sum(-2) + R.sum(-1) - R.sum(-2))
    last = gamma[..., -1].exp() * (dS_out * S).sum((-1, -2)) + state_in.sum(-1)
    dgamma = torch.cat([dgamma[..., :-1], (dgamma[..., -1] + last)[..., None]], dim=-1)
    dg = dgamma.flip(-1).cumsum(-1).flip(-1)
    return scale * dqs, dk, dbeta, dg


def l2norm_backward(x, dx_hat, eps: float = 1e-6):
    """Gradient through ``x / sqrt(sum x^2 + eps)`` given the gradient of its output."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    x_hat = x * r
    return r * (dx_hat - x_hat * (x_hat * dx_hat).sum(-1, keepdim=True))


def chunked_backward(q, k, v, g, beta, scale: float, initial_state, use_qk_l2norm_in_kernel: bool,
                     problem: Problem, batched: bool, state_v_first: bool, do, dht):
    """Gradients of q, k, v, g, beta and initial_state (None where there is none) for the user's
    tensors, through the three stages. ``dht``: the final state's gradient or None."""
    from .naive import l2norm

    dtype = compute_dtype(q, k, v)
    raw_q, raw_k = q.to(dtype), k.to(dtype)
    q, k = (l2norm(raw_q), l2norm(raw_k)) if use_qk_l2norm_in_kernel else (raw_q, raw_k)
    group = problem.group
    layout = ChunkLayout.build(problem.seq_lens, problem.tokens if batched else None, q.device)
    qc, kc = (layout.gather(x.repeat_interleave(group, dim=2)) for x in (q, k))
    vc, gc, bc, doc = (layout.gather(x.to(dtype)) for x in (v, g, beta, do))

    def as_kv(state):
        if state is None:
            return None
        state = state.to(dtype)
        return state.transpose(-1, -2) if state_v_first else state

    S = chunk_entry_states(kc, vc, gc, bc, as_kv(initial_state))
    dS_out, dvc, dh0 = state_gradient_walk(qc, kc, gc, bc, scale, doc, as_kv(dht))
    dqc, dkc, dbc, dgc = chunk_local_gradients(qc, kc, vc, gc, bc, scale, S, dS_out, doc, dvc)

    B, T, H = problem.batch, problem.tokens, problem.qk_heads
    per_head = lambda x: layout.scatter(x, B, T)
    dq, dk = (per_head(x).reshape(B, T, H, group, -1).sum(3) for x in (dqc, dkc))
    if use_qk_l2norm_in_kernel:
        dq, dk = l2norm_backward(raw_q, dq), l2norm_backward(raw_k, dk)
    dv = per_head(dvc)
    dg, dbeta = (per_head(x[..., None])[..., 0] for x in (dgc, dbc))
    if initial_state is not None:
        dh0 = dh0.transpose(-1, -2) if state_v_first else dh0
        dh0 = dh0.contiguous()
    else:
        dh0 = None
    return dq, dk, dv, dg, dbeta, dh0
