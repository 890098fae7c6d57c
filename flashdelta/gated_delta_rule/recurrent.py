"""FLA's ``fused_recurrent_gated_delta_rule`` call surface: the entry point models call at decode.

Until the decode kernel exists it runs the chunked op (kernels on Hopper, the exact PyTorch path
elsewhere): a decode step is a sequence of one token, which the chunked path computes exactly.
"""
from __future__ import annotations

import torch

from .api import chunk_gated_delta_rule


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                                     cu_seqlens=None, **kwargs):
    """The gated delta rule token by token, with FLA's signature and semantics.

    Arguments as ``chunk_gated_delta_rule``'s, in FLA's order for this op. ``g`` None: no decay
    (g = 0); ``beta`` None: beta = 1. ``gk`` / ``gv`` (per-key / per-value decays) are not supported.
    Other keywords (``backend``, ``cu_seqlens_cpu``, FLA's and models' extra ones) go to
    ``chunk_gated_delta_rule``. Unlike FLA's, this one is differentiable.

    Returns ``(o, final_state)`` as ``chunk_gated_delta_rule`` does.
    """
    if gk is not None or gv is not None:
        raise NotImplementedError("`gk` / `gv`: per-key and per-value decays are not supported by flashdelta")
    for name, x in (("q", q), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"`{name}`: expected a 4-D tensor [B, T, heads, dim], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    gate_shape = (*v.shape[:3],)
    gate_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if g is None:
        if use_gate_in_kernel:
            raise ValueError("`g`: the raw gate input is required with use_gate_in_kernel=True")
        g = torch.zeros(gate_shape, dtype=gate_dtype, device=q.device)
    if beta is None:
        if use_beta_sigmoid_in_kernel:
            raise ValueError("`beta`: the logits are required with use_beta_sigmoid_in_kernel=True")
        beta = torch.ones(gate_shape, dtype=gate_dtype, device=q.device)
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state,
                                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                                  use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                                  allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first,
                                  cu_seqlens=cu_seqlens, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log,
                                  dt_bias=dt_bias, **kwargs)
