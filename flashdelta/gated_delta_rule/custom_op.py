"""``chunk_gated_delta_rule`` as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` the public function calls ``flashdelta::chunk_gated_delta_rule`` instead of
running eagerly. Dynamo then sees one opaque op whose fake implementation gives the output shapes
from the input shapes alone, so:

- nothing data-dependent is traced (reading ``cu_seqlens``, planning, building tables, launching);
  the real implementation is the eager call, run when the compiled graph runs;
- sequence lengths and batch sizes stay symbolic (``dynamic=True`` compiles once);
- ``fullgraph=True`` holds: no graph break around the op.

Autograd goes through a second op, ``flashdelta::chunk_gated_delta_rule_bwd``, so the compiled
backward graph holds it as one node too. Where the call runs on the kernels, that is the kernels'
backward (``hopper.backward``); elsewhere it recomputes the forward on the PyTorch path and takes its
vector-Jacobian product with ``torch.func.vjp`` (autograd proper is disabled inside an op's
implementation; functorch transforms are not), for exactly the inputs that need a gradient.

Calls on a state pool (``state_indices``) go through a third op, ``flashdelta::gated_delta_rule_pooled``,
which declares the pool mutated (functionalisation then orders the in-place update correctly).

Eager calls do not go through these ops: the dispatcher's Python custom-op path costs host time that
eager callers would pay on every call, and gives them nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .chunked import compute_dtype

def compiled_call(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                  cu_seqlens, cu_seqlens_cpu, state_v_first, backend, context_parallel):
    """What ``chunk_gated_delta_rule`` returns, through the custom op (called while tracing)."""
    from .api import grad_needed
    o, final = chunk_gated_delta_rule_op(
        q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, None if scale is None else float(scale),
        bool(output_final_state), bool(use_qk_l2norm_in_kernel), bool(state_v_first), backend,
        _encode_cp(context_parallel), grad_needed(q, k, v, g, beta, initial_state))
    return o, (final if output_final_state else None)


def compiled_pooled_call(q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel,
                         cu_seqlens, cu_seqlens_cpu, state_v_first, backend, context_parallel, decode, activation):
    """What a call on a state pool returns (o), through the custom op that declares the pool mutated."""
    a = activation
    return pooled_op(q, k, v, g, beta, pool, state_indices, num_accepted_tokens, cu_seqlens, cu_seqlens_cpu,
                     None if a is None else a.A_log, None if a is None else a.dt_bias,
                     None if scale is None else float(scale), bool(use_qk_l2norm_in_kernel), bool(state_v_first),
                     backend, _encode_cp(context_parallel), bool(decode),
                     [a is not None and a.gate, a is not None and a.beta_sigmoid, a is not None and a.neg_eigval])


def _encode_cp(context_parallel) -> Optional[int]:
    """The op schema has no bool-or-int: None stays None, False is 0, True is -1, n chunks is n."""
    if context_parallel is None:
        return None
    return -1 if context_parallel is True else int(context_parallel)


def _decode_cp(cp: Optional[int]):
    return None if cp is None else {-1: True, 0: False}.get(cp, cp)


def _unaliased(out: Tensor, inputs) -> Tensor:
    """Custom ops may not return an input's memory (the torch path can hand back h0 or dht as is)."""
    if any(x is not None and x.numel() and x.data_ptr() == out.data_ptr() for x in inputs):
        return out.clone()
    return out


@torch.library.custom_op("flashdelta::chunk_gated_delta_rule", mutates_args=())
def chunk_gated_delta_rule_op(
        q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor],
        cu_seqlens: Optional[Tensor], cu_seqlens_cpu: Optional[Tensor], scale: Optional[float],
        output_final_state: bool, use_qk_l2norm_in_kernel: bool, state_v_first: bool, backend: str,
        context_parallel: Optional[int], needs_grad: bool) -> tuple[Tensor, Tensor]:
    """(o, final state); the final state is an empty tensor when ``output_final_state`` is False."""
    from .api import run
    o, final = run(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                   cu_seqlens, state_v_first, backend, _decode_cp(context_parallel), cu_seqlens_cpu, needs_grad)
    if final is None:
        final = q.new_empty(0, dtype=compute_dtype(q, k, v))
    return o, _unaliased(final, (initial_state,))


@chunk_gated_delta_rule_op.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, scale, output_final_state,
      use_qk_l2norm_in_kernel, state_v_first, backend, context_parallel, needs_grad):
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, HV, V)
    state = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    final = q.new_empty(state if output_final_state else (0,), dtype=compute_dtype(q, k, v))
    return o, final


@torch.library.custom_op("flashdelta::chunk_gated_delta_rule_bwd", mutates_args=())
def chunk_gated_delta_rule_bwd_op(
        q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor],
        cu_seqlens: Optional[Tensor], cu_seqlens_cpu: Optional[Tensor], do: Tensor, dfinal: Optional[Tensor],
        scale: Optional[float], use_qk_l2norm_in_kernel: bool, state_v_first: bool, backend: str,
        context_parallel: Optional[int], wanted: list[bool]) -> list[Tensor]:
    """Gradients of q, k, v, g, beta, initial_state (an empty tensor where not ``wanted``).
    ``dfinal``: the final state's gradient, or None when the forward did not return it."""
    from .api import kernel_backward, run
    inputs = [q, k, v, g, beta, initial_state]
    where = [i for i, w in enumerate(wanted) if w and inputs[i] is not None]
    grads = kernel_backward(q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel, cu_seqlens,
                            state_v_first, backend, _decode_cp(context_parallel), cu_seqlens_cpu, do, dfinal)
    if grads is not None:
        return [grad if i in where else q.new_empty(0) for i, grad in enumerate(grads)]

    def forward(*primals):
        args = list(inputs)
        for i, x in zip(where, primals):
            args[i] = x
        o, final = run(*args[:5], scale, args[5], dfinal is not None, use_qk_l2norm_in_kernel, cu_seqlens,
                       state_v_first, "torch", _decode_cp(context_parallel), cu_seqlens_cpu, True)
        return (o, final) if dfinal is not None else (o,)

    grads = [None] * 6
    if where:
        _, vjp = torch.func.vjp(forward, *(inputs[i] for i in where))
        cotangents = (do, dfinal) if dfinal is not None else (do,)
        for i, grad in zip(where, vjp(cotangents)):
            grads[i] = _unaliased(grad, (do, dfinal))
    return [q.new_empty(0) if grad is None else grad for grad in grads]


@chunk_gated_delta_rule_bwd_op.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, do, dfinal, scale, use_qk_l2norm_in_kernel,
      state_v_first, backend, context_parallel, wanted):
    inputs = (q, k, v, g, beta, initial_state)
    return [torch.empty_like(x) if w and x is not None else q.new_empty(0) for x, w in zip(inputs, wanted)]


def _setup_context(ctx, inputs, output):
    (q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, scale, output_final_state,
     use_qk_l2norm_in_kernel, state_v_first, backend, context_parallel, _) = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu)
    ctx.options = (scale, use_qk_l2norm_in_kernel, state_v_first, backend, context_parallel)
    ctx.output_final_state = output_final_state


def _backward(ctx, do, dfinal):
    q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu = ctx.saved_tensors
    wanted = list(ctx.needs_input_grad[:6])
    grads = chunk_gated_delta_rule_bwd_op(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, do,
                                          dfinal if ctx.output_final_state else None, *ctx.options, wanted)
    return (*(grad if w else None for grad, w in zip(grads, wanted)), *([None] * 9))


chunk_gated_delta_rule_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("flashdelta::gated_delta_rule_pooled", mutates_args=("pool",))
def pooled_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, pool: Tensor, state_indices: Tensor,
              num_accepted_tokens: Optional[Tensor], cu_seqlens: Optional[Tensor], cu_seqlens_cpu: Optional[Tensor],
              A_log: Optional[Tensor], dt_bias: Optional[Tensor], scale: Optional[float],
              use_qk_l2norm_in_kernel: bool, state_v_first: bool, backend: str, context_parallel: Optional[int],
              decode: bool, activations: list[bool]) -> Tensor:
    """o of a call on a state pool (``serving``); the pool is updated in place. ``activations``: the
    gate, beta-sigmoid and negative-eigenvalue flags of ``gates.Activation``. Serving calls take no
    gradients, so this op has no backward."""
    from .gates import Activation
    from .serving import pooled_call
    activation = Activation(activations[0], A_log, dt_bias, *activations[1:]) if any(activations) else None
    return pooled_call(q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel,
                       cu_seqlens, cu_seqlens_cpu, state_v_first, backend, _decode_cp(context_parallel), decode,
                       activation)


@pooled_op.register_fake
def _(q, k, v, g, beta, pool, state_indices, num_accepted_tokens, cu_seqlens, cu_seqlens_cpu, A_log, dt_bias, scale,
      use_qk_l2norm_in_kernel, state_v_first, backend, context_parallel, decode, activations):
    return q.new_empty(*v.shape)
