"""FLA's ``fused_recurrent_gated_delta_rule`` call surface: the entry point models and servers call at decode.

Without a state pool it runs the chunked op (kernels on Hopper, the exact PyTorch path elsewhere): a
decode step is a sequence of one token, which the chunked path computes exactly. With one
(``state_indices``) it runs the serving path (``serving``): the state walked token by token, read from
and written to the pool in place, with per-step slots for speculative verify.
"""
from __future__ import annotations

import torch

from .api import _fla_options, chunk_gated_delta_rule, pooled
from .gates import Activation
from .serving import dense_decode


def fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm_in_kernel=False,
                                     use_gate_in_kernel=False, A_log=None, dt_bias=None,
                                     use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False,
                                     cu_seqlens=None, *, state_indices=None, num_accepted_tokens=None, **kwargs):
    """The gated delta rule token by token, with FLA's signature and semantics.

    Arguments as ``chunk_gated_delta_rule``'s, in FLA's order for this op. ``g`` None: no decay
    (g = 0); ``beta`` None: beta = 1. ``gk`` / ``gv`` (per-key / per-value decays) are not supported.
    Other keywords (``backend``, ``cu_seqlens_cpu``, FLA's and models' extra ones) go to
    ``chunk_gated_delta_rule``. Unlike FLA's, this one is differentiable (without a pool).

    Serving extensions (vLLM's conventions; ``ssm_state_indices`` is accepted as another name):

    - ``state_indices`` ``[N]``: ``initial_state`` is a state pool; sequence n (of any number of tokens)
      starts from ``initial_state[state_indices[n]]`` and its final state is written back there.
    - ``state_indices`` ``[N, steps]`` (speculative verify): the state after token t of sequence n is
      written to ``initial_state[state_indices[n, t]]``, and the sequence starts from the slot of column
      ``num_accepted_tokens[n] - 1`` (column 0 without ``num_accepted_tokens``).
    - a slot of -1 starts from zero / stores nothing. Pools are float32, bfloat16 or float16, K- or
      V-major (``state_v_first``); the state is computed in float32 and rounded once on store.

    Returns ``(o, final_state)`` as ``chunk_gated_delta_rule`` does; ``(o, None)`` on a pool.
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
    if "ssm_state_indices" in kwargs:
        if state_indices is not None:
            raise ValueError("pass `state_indices` or its other name `ssm_state_indices`, not both")
        state_indices = kwargs.pop("ssm_state_indices")
    if num_accepted_tokens is not None and state_indices is None:
        raise ValueError("`num_accepted_tokens`: needs per-step `state_indices` [N, steps] (speculative verify)")
    backend, context_parallel = kwargs.pop("backend", "auto"), kwargs.pop("context_parallel", None)
    cu_seqlens_cpu = kwargs.pop("cu_seqlens_cpu", None)
    # the activations stay with the raw gates until the path is known: the decode kernel applies them itself
    activation = Activation.of(g, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    if kwargs.pop("cp_context", None) is not None:
        raise NotImplementedError("`cp_context`: use chunk_gated_delta_rule for context parallelism across ranks")
    _, _, state_v_first, context_parallel = _fla_options(g, beta, state_v_first, context_parallel,
                                                         use_qk_l2norm_in_kernel, **kwargs)
    if state_indices is not None:
        return pooled(q, k, v, g, beta, scale, initial_state, state_indices, num_accepted_tokens,
                      use_qk_l2norm_in_kernel, cu_seqlens, cu_seqlens_cpu, state_v_first, backend, context_parallel,
                      decode=True, activation=activation), None
    done = dense_decode(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                        cu_seqlens, cu_seqlens_cpu, state_v_first, backend, activation)
    if done is not None:
        return done
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                                  use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens,
                                  cu_seqlens_cpu, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                                  backend=backend, context_parallel=context_parallel)
