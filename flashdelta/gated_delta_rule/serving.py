"""Calls on a state pool (``state_pool``): chunked prefill and token-step decode, as servers make them.

Both entry points come here when given ``state_indices``:

- ``chunk_gated_delta_rule``: each sequence's initial state is read from its slot and its final state
  written back. The chunked op runs on the states gathered from the pool (kernels where they apply).
- ``fused_recurrent_gated_delta_rule``: a few tokens per sequence, the state walked token by token; with
  2-D indices every intermediate state is kept in its own slot (speculative verify) and
  ``num_accepted_tokens`` picks the slot each sequence starts from. On Hopper the decode kernel
  (``hopper.recurrent_step``) reads and writes the pool in place; ``token_steps`` below is this
  path's PyTorch implementation and specification. The same kernel serves short dense-state calls
  (``dense_decode``), up to the planner's ``DECODE_MAX_TOKENS`` tokens per sequence.

Every read of the pool happens before any write, so a sequence may start from a slot it then writes.
"""
from __future__ import annotations

import torch

from .chunked import compute_dtype
from .inputs import INDEX_DTYPES, host_table, sequence_starts, validate
from .naive import l2norm
from .state_pool import check_pool, check_slots, read_states, write_states


def pooled_call(q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel,
                cu_seqlens, cu_seqlens_cpu, state_v_first: bool, backend: str, context_parallel, decode: bool,
                activation=None, checkpoints=None):
    """Validate, run, update ``pool`` in place; returns o ``[B, T, HV, V]`` in q's dtype. ``activation``:
    the ``gates.Activation`` still to apply to (g, beta) (by the decode kernel where it runs), or None."""
    from .api import check_options, run
    check_options(backend, context_parallel)
    problem = validate(q, k, v, g, beta, None, cu_seqlens, cu_seqlens_cpu, False)
    check_pool(pool, state_indices, problem.num_seqs, problem.v_heads, problem.k_dim, problem.v_dim, state_v_first,
               q.device, steps=max(problem.seq_lens, default=0) if decode else None)
    per_step = state_indices.dim() == 2
    _check_accepted(num_accepted_tokens, state_indices, problem.num_seqs)
    check_slots(state_indices, pool.shape[0], problem.seq_lens if per_step else None, num_accepted_tokens)
    scale = problem.k_dim ** -0.5 if scale is None else float(scale)

    first = state_indices
    if per_step:
        column = (num_accepted_tokens.long() - 1 if num_accepted_tokens is not None
                  else torch.zeros_like(state_indices[:, 0], dtype=torch.long))
        first = state_indices.gather(1, column[:, None]).squeeze(1)
    if decode and _decode_on_kernels(q, v, problem, pool, backend, _grads(q, k, v, g, beta, activation)):
        from .hopper.decode import hopper_decode
        return hopper_decode(q, k, v, g, beta, scale, pool, first, pool, first, state_indices if per_step else None,
                             use_qk_l2norm_in_kernel, problem.seq_lens, cu_seqlens is None, state_v_first,
                             None if activation is None else activation.kernel_args())
    if activation is not None:
        g, beta = activation.apply(g, beta)
    if decode:
        return token_steps(q, k, v, g, beta, scale, pool, first, state_indices if per_step else None,
                           use_qk_l2norm_in_kernel, problem, cu_seqlens is None, state_v_first)
    # the states stay in the pool's layout throughout: the op takes either (state_v_first)
    h0 = read_states(pool, first, False, compute_dtype(q, k, v))
    o, final = run(q, k, v, g, beta, scale, h0, True, use_qk_l2norm_in_kernel, cu_seqlens, state_v_first, backend,
                   context_parallel, cu_seqlens_cpu, checkpoints=checkpoints)
    write_states(pool, state_indices, final, False)
    return o


def dense_decode(q, k, v, g, beta, scale, initial_state, output_final_state: bool, use_qk_l2norm_in_kernel: bool,
                 cu_seqlens, cu_seqlens_cpu, state_v_first: bool, backend: str, activation=None):
    """``fused_recurrent_gated_delta_rule`` on a dense state, on the decode kernel: (o, final state), or
    None where the kernel does not apply (gradients, longer sequences, no kernel for the call): the
    caller then runs the chunked op, which also raises on bad arguments."""
    from .planner import DECODE_MAX_TOKENS
    # the cheap refusals first: the chunked op validates the arguments again where this returns None
    if backend == "torch" or not q.is_cuda or torch.compiler.is_compiling() \
            or _grads(q, k, v, g, beta, activation, initial_state):
        return None
    problem = validate(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, state_v_first)
    if max(problem.seq_lens, default=0) > DECODE_MAX_TOKENS or not _decode_on_kernels(q, v, problem, None, "auto", False):
        return None
    from .hopper.decode import dense_rows, hopper_decode, pool_unsupported
    from .hopper.forward import flat, unused_rows
    N, HV, K, V = problem.num_seqs, problem.v_heads, problem.k_dim, problem.v_dim
    inner = (V, K) if state_v_first else (K, V)
    unused = unused_rows(HV, K * V, torch.float32, q.device).view(1, HV, *inner)
    h0 = unused if initial_state is None else flat(initial_state, N, HV, *inner, dtype=torch.float32)
    if pool_unsupported(h0):                # a view at an odd offset: the kernel's loads need 16 bytes
        return None
    ht = torch.empty(N, HV, *inner, dtype=torch.float32, device=q.device) if output_final_state else unused
    o = hopper_decode(q, k, v, g, beta, problem.k_dim ** -0.5 if scale is None else float(scale), h0,
                      dense_rows(N, initial_state is not None, q.device), ht, dense_rows(N, output_final_state, q.device),
                      None, use_qk_l2norm_in_kernel, problem.seq_lens, cu_seqlens is None, state_v_first,
                      None if activation is None else activation.kernel_args())
    return o, (ht if output_final_state else None)


def _grads(q, k, v, g, beta, activation, *more) -> bool:
    from .api import grad_needed
    gates = () if activation is None else (activation.A_log, activation.dt_bias)
    return grad_needed(q, k, v, g, beta, *gates, *more)


def _decode_on_kernels(q, v, problem, pool, backend: str, needs_grad: bool) -> bool:
    """Whether the decode kernel runs this call; raises where ``backend="tilelang"`` demands it and it cannot."""
    if backend == "torch":
        return False
    from .api import _tilelang_unavailable
    reason = _tilelang_unavailable(q, v, problem)
    if reason is None and pool is not None:
        from .hopper.decode import pool_unsupported
        reason = pool_unsupported(pool)
    if reason is None and needs_grad:
        reason = "the decode kernel has no backward"
    if reason is None:
        return True
    if backend == "tilelang":
        raise RuntimeError(f"backend='tilelang' cannot run this call: {reason}")
    return False


def _check_accepted(num_accepted_tokens, state_indices, num_seqs: int) -> None:
    if num_accepted_tokens is None:
        return
    if not isinstance(num_accepted_tokens, torch.Tensor) or num_accepted_tokens.dtype not in INDEX_DTYPES:
        raise TypeError("`num_accepted_tokens`: expected an int32/int64 tensor [N]")
    if state_indices.dim() != 2:
        raise ValueError("`num_accepted_tokens`: needs per-step `state_indices` [N, steps] (speculative verify)")
    if tuple(num_accepted_tokens.shape) != (num_seqs,) or num_accepted_tokens.device != state_indices.device:
        raise ValueError(f"`num_accepted_tokens`: expected shape [N={num_seqs}] on {state_indices.device}, got "
                         f"{tuple(num_accepted_tokens.shape)} on {num_accepted_tokens.device}")


def token_steps(q, k, v, g, beta, scale: float, pool, first_rows, step_rows, use_qk_l2norm_in_kernel: bool,
                problem, batched: bool, state_v_first: bool):
    """The recurrence token by token, vectorised over the sequences alive at each step.

    Sequence n starts from ``pool[first_rows[n]]``; with ``step_rows`` ([N, steps]) the state after its
    token t goes to ``pool[step_rows[n, t]]``, else its final state to ``pool[first_rows[n]]``. The
    state is kept in float32 (float64 for float64 inputs); o is returned in q's dtype."""
    dtype, out_dtype = compute_dtype(q, k, v), q.dtype
    B, T, H, K = q.shape
    HV, V = problem.v_heads, problem.v_dim
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k = (x.reshape(B * T, H, K).repeat_interleave(problem.group, dim=1) for x in (q, k))
    v, g, beta = v.reshape(B * T, HV, V), g.reshape(B * T, HV), beta.reshape(B * T, HV)

    lens = problem.seq_lens
    starts = sequence_starts(lens, T if batched else None)
    S = read_states(pool, first_rows, state_v_first, dtype)
    o = v.new_empty(B * T, HV, V)
    for t in range(max(lens, default=0)):
        live = [n for n, L in enumerate(lens) if t < L]
        seq = host_table(live, torch.long, q.device)
        tok = host_table([starts[n] + t for n in live], torch.long, q.device)
        s = S[seq] * g[tok].exp()[..., None, None]
        err = v[tok] - torch.einsum("nhkv,nhk->nhv", s, k[tok])
        s = s + (beta[tok][..., None] * k[tok])[..., :, None] * err[..., None, :]
        o[tok] = scale * torch.einsum("nhkv,nhk->nhv", s, q[tok])
        S = S.index_copy(0, seq, s)
        if step_rows is not None:
            write_states(pool, step_rows[seq, t], s, state_v_first)
    if step_rows is None:
        write_states(pool, first_rows, S, state_v_first)
    return o.view(B, T, HV, V).to(out_dtype)
