"""Ground truth: the gated delta rule token by token (DESIGN section 1).

Slow by design and differentiable through autograd. Run it in float64 to get reference values.
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim: FLA's in-kernel q/k normalisation."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def naive_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None, state_v_first=False,
                           dtype: torch.dtype = torch.float64):
    """Token-by-token recurrence in ``dtype``; same arguments and layouts as ``chunk_gated_delta_rule``.

    Returns ``(o, final_state)``, both in ``dtype``.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q.repeat_interleave(HV // H, dim=2)
    k = k.repeat_interleave(HV // H, dim=2)

    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        offsets = cu_seqlens.tolist()
        spans = [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]

    outputs = [None] * len(spans)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is None:
            S = q.new_zeros(HV, K, V)
        else:
            S = initial_state[n].to(dtype)
            S = S.transpose(-1, -2) if state_v_first else S
        rows = []
        for t in range(start, end):
            kt, vt, qt = k[b, t], v[b, t], q[b, t]                        # [HV, K], [HV, V], [HV, K]
            S = S * g[b, t].exp()[:, None, None]
            err = vt - torch.einsum("hkv,hk->hv", S, kt)                  # v_t - S^T k_t
            S = S + beta[b, t][:, None, None] * kt[:, :, None] * err[:, None, :]
            rows.append(scale * torch.einsum("hkv,hk->hv", S, qt))
        outputs[n] = torch.stack(rows) if rows else q.new_zeros(0, HV, V)
        finals.append(S.transpose(-1, -2) if state_v_first else S)

    if cu_seqlens is None:
        o = torch.stack(outputs)
    else:
        o = torch.cat(outputs)[None]
    final = torch.stack(finals) if output_final_state else None
    return o, final
