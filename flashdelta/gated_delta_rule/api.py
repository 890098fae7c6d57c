"""Public entry point: FLA's ``chunk_gated_delta_rule`` call surface, dispatched per device."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .checkpoints import Checkpoints
from .chunked import chunked_gated_delta_rule
from .context_parallel import TRUNCATION_TAU
from .gates import activate, needs_activation
from .inputs import sm_count, validate
from .planner import TUNING, Plan, backward_plan, backward_tiles, plan_forward

logger = logging.getLogger("flashdelta")

BACKENDS = ("auto", "tilelang", "torch")

# FLA keyword arguments that change nothing here (FLA's own scheduling hints).
_NO_EFFECT = ("chunk_indices",)
CHUNK_SIZES = (16, 32, 64)      # FLA's; the result depends on the chunk size only through rounding


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                           cp_context=None, *, use_gate_in_kernel=False, A_log=None, dt_bias=None,
                           state_indices=None, checkpoint_every=None, checkpoints=None, backend="auto",
                           context_parallel=None, **kwargs):
    r"""Gated delta rule, chunked, with FLA's semantics (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``).

    Per sequence and value head, with state ``S`` (K x V, fp32)::

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

    The positional order is FLA's.

    Args:
        q, k: ``[B, T, H, K]``, float16 / bfloat16 / float32 / float64.
        v: ``[B, T, HV, V]``; HV a multiple of H (value head h reads q/k head ``h // (HV // H)``).
        g: ``[B, T, HV]`` log-decay (natural log, <= 0); with ``use_gate_in_kernel`` its raw input.
        beta: ``[B, T, HV]``; with ``use_beta_sigmoid_in_kernel`` its logits.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``), any float dtype;
            N = B, or the number of sequences with ``cu_seqlens``. With ``state_indices``: a state pool
            ``[slots, HV, K, V]`` (``[slots, HV, V, K]``), float32 / bfloat16 / float16, rows may be
            strided.
        output_final_state: also return the state after the last token.
        use_qk_l2norm_in_kernel: normalise q and k (``x / sqrt(sum x^2 + 1e-6)``) first. Without it,
            the kernels need keys with ``|k|^2 < 65504`` (the per-chunk inverse runs on fp16 operands;
            the delta rule itself needs ``beta |k|^2 <= 2``).
        use_beta_sigmoid_in_kernel: beta = sigmoid(beta) first; ``allow_neg_eigval`` doubles it
            (beta in (0, 2): eigenvalues of I - beta k k^T down to -1); FLA's options, see ``gates``.
        state_v_first: state layout ``[.., V, K]`` instead of ``[.., K, V]``.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of independent sequences packed in T (B must be 1);
            segments may be empty. Its values must be known on the host: pass ``cu_seqlens_cpu`` (the
            same offsets on the CPU) to avoid any synchronisation; otherwise the offsets are copied to
            the host once per ``cu_seqlens`` tensor and cached (the only host-device synchronisation of
            this call), or on every call for an inference tensor, which has no version counter to
            tell a change.
        chunk_indices: FLA's precomputed chunk table; not needed here and ignored.
        cp_context: context parallelism across processes (``distributed``): a ``CPContext`` or FLA's
            ``FLACPContext``; q, k, v, g, beta hold this rank's tokens and ``cu_seqlens`` its local
            boundaries (or None); no ``initial_state``. Differentiable; one all-gather forward.
        use_gate_in_kernel, A_log, dt_bias: g = -exp(A_log) * softplus(g + dt_bias) first, with A_log
            and dt_bias (optional) of one value per value head (``[HV]``); FLA's option.
        state_indices: ``[N]`` int32/int64 slots of the pool ``initial_state``: sequence n starts from
            ``initial_state[state_indices[n]]`` and its final state is written back to that row in
            place (computed in fp32, rounded once to the pool's dtype); -1 starts from zero and stores
            nothing. The slots are checked (in range, none written twice) with one read of their
            values per index tensor and version, skipped during CUDA graph capture. See ``state_pool``.
        checkpoint_every, checkpoints: also store the state after every ``checkpoint_every`` tokens (a
            multiple of 64) of each sequence into the buffer ``checkpoints``, for prefix caching; its row
            layout is ``checkpoints.checkpoint_offsets``'s. On the kernels for a buffer of q's dtype
            (one extra state-only walk) without gradients, else on the PyTorch path.
        backend: ``"auto"`` (TileLang kernels on Hopper when they apply, else PyTorch), ``"tilelang"``
            or ``"torch"`` (exact chunked PyTorch; differentiable on every device).
        context_parallel: split long sequences into segments processed in parallel (DESIGN section 3):
            None = the planner decides (kernel path only), False = never, True = always, an int =
            that many 64-token chunks per segment. Needs K == V. Where the gate-driven truncation
            applies, results differ from the unsplit ones by at most e^-12 of the state's norm.

    Other keywords are FLA's: ``chunk_size`` (16, 32 or 64; the result depends on it only through
    rounding, and flashdelta computes with 64), ``head_first=False``, ``transpose_state_layout`` (the
    old name of ``state_v_first``). Unknown keywords are ignored with a debug log, as FLA does, so
    that models forwarding their ``**kwargs`` (``use_cache``, ``cu_seq_lens_k``, ...) work unchanged.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in q's dtype; final_state fp32 (float64 for float64
        inputs) or None; None with ``state_indices`` (the final states are in the pool).
    """
    g, beta, state_v_first, context_parallel = _fla_options(
        g, beta, state_v_first, context_parallel, use_qk_l2norm_in_kernel, use_gate_in_kernel, A_log,
        dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval, **kwargs)
    saved = Checkpoints.of(checkpoint_every, checkpoints)
    if cp_context is not None:
        return _across_ranks(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                             state_v_first, cu_seqlens, cp_context, backend, state_indices, saved)
    if saved is not None and torch.compiler.is_compiling():
        raise NotImplementedError("`checkpoints` under torch.compile: not supported yet (call the op eagerly)")
    if state_indices is not None:
        return pooled(q, k, v, g, beta, scale, initial_state, state_indices, None, use_qk_l2norm_in_kernel,
                      cu_seqlens, cu_seqlens_cpu, state_v_first, backend, context_parallel, decode=False,
                      checkpoints=saved), None
    if torch.compiler.is_compiling():
        # Traced as one opaque op with a shape-only fake: lengths, plans and launches stay out of the graph.
        from .custom_op import compiled_call
        check_options(backend, context_parallel)
        return compiled_call(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                             cu_seqlens, cu_seqlens_cpu, state_v_first, backend, context_parallel)
    return run(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
               state_v_first, backend, context_parallel, cu_seqlens_cpu, checkpoints=saved)


def pooled(q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, cu_seqlens,
           cu_seqlens_cpu, state_v_first, backend, context_parallel, decode: bool, activation=None, checkpoints=None):
    """A call on a state pool (``serving``), eager or, under ``torch.compile``, through its custom op.
    ``activation``: the ``gates.Activation`` still to apply to (g, beta), or None; ``checkpoints``:
    a ``checkpoints.Checkpoints`` (eager calls only: the caller refuses them under compile)."""
    args = (q, k, v, g, beta, scale, pool, state_indices, num_accepted_tokens, use_qk_l2norm_in_kernel, cu_seqlens,
            cu_seqlens_cpu, state_v_first, backend, context_parallel, decode, activation)
    if torch.compiler.is_compiling():
        from .custom_op import compiled_pooled_call
        check_options(backend, context_parallel)
        return compiled_pooled_call(*args)
    from .serving import pooled_call
    return pooled_call(*args, checkpoints)


def run(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
        state_v_first, backend, context_parallel, cu_seqlens_cpu=None, needs_grad=None, checkpoints=None):
    """The eager call. ``needs_grad``: whether the caller differentiates the result (None: from the
    grad mode and the inputs; the compiled op passes what it saw while tracing). ``checkpoints``: a
    ``checkpoints.Checkpoints`` to fill, or None."""
    problem, route = _decide(q, k, v, g, beta, initial_state, cu_seqlens, state_v_first, backend,
                             context_parallel, cu_seqlens_cpu, needs_grad, checkpoints)
    scale = problem.k_dim ** -0.5 if scale is None else float(scale)
    args = (q, k, v, g, beta, scale, initial_state, bool(output_final_state), bool(use_qk_l2norm_in_kernel))
    batched = cu_seqlens is None

    if route.kernels:
        from .hopper.context_parallel import hopper_cp_forward
        from .hopper.forward import hopper_forward
        if route.plan.context_parallel:
            launch = _with_backward(hopper_cp_forward, route.needs_grad, problem, cu_seqlens, state_v_first,
                                    route.backward_plan)
            return launch(*args, cu_seqlens, problem.seq_lens, state_v_first, route.plan)
        if checkpoints is not None:                  # serving calls: no gradients (see _decide)
            return hopper_forward(*args, cu_seqlens, problem.seq_lens, state_v_first, route.plan.v_tile,
                                  checkpoints=checkpoints)
        launch = _with_backward(hopper_forward, route.needs_grad, problem, cu_seqlens, state_v_first)
        return launch(*args, cu_seqlens, problem.seq_lens, state_v_first, route.plan.v_tile)

    logger.debug("flashdelta: %s", route)
    segments = {} if route.plan is None else {"segment_chunks": route.plan.segment_chunks,
                                              "truncate_below": TRUNCATION_TAU}
    return chunked_gated_delta_rule(*args, problem, batched=batched, state_v_first=state_v_first,
                                    checkpoints=checkpoints, **segments)


def explain(q, k, v, g, beta, initial_state=None, cu_seqlens=None, state_v_first=False, backend="auto",
            context_parallel=None, cu_seqlens_cpu=None, **kwargs) -> str:
    """Which path ``chunk_gated_delta_rule`` takes for these arguments, and why (host work only).

    E.g. ``"tilelang, unsplit, V tile 128"``, ``"tilelang, context parallel: 16 segments of 32
    chunks, V tile 128"`` or ``"torch (tensors are on cpu, ...)"``; ``"; autograd"`` is added where
    the call will be differentiated (grad mode on and an input requiring grad), which ``no_grad`` and
    ``inference_mode`` turn off, as they do for the call itself. Takes the op's other keywords too;
    with ``state_indices`` it says how the pool is read and written.
    """
    kwargs.pop("scale", None), kwargs.pop("output_final_state", None), kwargs.pop("cp_context", None)
    l2norm = kwargs.pop("use_qk_l2norm_in_kernel", False)
    state_indices = kwargs.pop("state_indices", None)
    saved = Checkpoints.of(kwargs.pop("checkpoint_every", None), kwargs.pop("checkpoints", None))
    g, beta, state_v_first, context_parallel = _fla_options(g, beta, state_v_first, context_parallel, l2norm,
                                                            **kwargs)
    route = str(_decide(q, k, v, g, beta, None if state_indices is not None else initial_state, cu_seqlens,
                        state_v_first, backend, context_parallel, cu_seqlens_cpu, checkpoints=saved)[1])
    return route + ("; state pool rows read before and written after the call" if state_indices is not None else "")


@dataclass(frozen=True)
class Route:
    """The decision for one call: kernels (with their layout) or the PyTorch path (and why)."""

    kernels: bool
    plan: Plan | None          # kernels: always; torch path: a CP plan when one was asked for
    needs_grad: bool
    reason: str = ""           # why the PyTorch path
    backward_plan: Plan | None = None   # kernels: the segments the backward walks, None = unsplit

    def __str__(self):
        if self.kernels:
            backward = "; TileLang backward" + (", context parallel" if self.backward_plan else "")
            return "tilelang, " + _describe_plan(self.plan) + (backward if self.needs_grad else "")
        return (f"torch ({self.reason})" + (", " + _describe_plan(self.plan) if self.plan else "")
                + ("; autograd" if self.needs_grad else ""))


def _describe_plan(plan: Plan) -> str:
    if plan.context_parallel:
        return (f"context parallel: {len(plan.segments)} segments of {plan.segment_chunks} chunks, "
                f"V tile {plan.v_tile}")
    return f"unsplit, V tile {plan.v_tile}"


def _across_ranks(q, k, v, g, beta, scale, initial_state, output_final_state, l2norm, state_v_first, cu_seqlens,
                  cp_context, backend, state_indices, checkpoints):
    """``chunk_gated_delta_rule`` under ``cp_context`` (``distributed``)."""
    from .distributed import check_context, cp_forward, require_initialised
    check_context(cp_context)
    for name, x in (("initial_state", initial_state), ("state_indices", state_indices), ("checkpoints", checkpoints)):
        if x is not None:
            raise ValueError(f"`{name}`: not supported with `cp_context` (the first rank's sequences start from zero)")
    require_initialised()
    if torch.compiler.is_compiling():
        raise NotImplementedError("`cp_context` under torch.compile: not supported yet (call the op eagerly)")

    def op(q, k, v, g, beta, h0, cu_cpu):
        cu = None if cu_cpu is None else cu_cpu.to(q.device, non_blocking=True)
        return run(q, k, v, g, beta, scale, h0, True, l2norm, cu, False, backend, False, cu_cpu)
    o, final = cp_forward(q, k, v, g, beta, cu_seqlens, state_v_first, cp_context, op)
    return o, (final if output_final_state else None)


def _fla_options(g, beta, state_v_first, context_parallel, l2norm, use_gate_in_kernel=False,
                 A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, **kwargs):
    """FLA's options: (g, beta) activated as asked (``gates``), ``state_v_first`` (also under FLA's
    deprecated name ``transpose_state_layout``) and ``context_parallel``. Raises on a value this call
    cannot honour; logs and ignores keywords it does not know."""
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("pass `state_v_first` or its deprecated name `transpose_state_layout`, not both")
        state_v_first = kwargs.pop("transpose_state_layout")
    if kwargs.pop("head_first", False):
        raise ValueError("`head_first=True` is not supported: inputs must be [B, T, H, ...] (as in FLA)")
    chunk_size = kwargs.pop("chunk_size", 64)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"`chunk_size`: expected one of {CHUNK_SIZES} (FLA's), got {chunk_size!r}")
    ignored = [name for name in kwargs if name not in _NO_EFFECT]
    if ignored:
        logger.debug("flashdelta: ignoring keyword arguments %s", sorted(ignored))
    if needs_activation(use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval) \
            or A_log is not None or dt_bias is not None:
        g, beta = activate(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
        # The planner's segments rely on beta |k|^2 <= 2, which beta in (0, 2) keeps only for unit keys.
        if allow_neg_eigval and not l2norm and context_parallel is None:
            context_parallel = False
    return g, beta, bool(state_v_first), context_parallel


def _decide(q, k, v, g, beta, initial_state, cu_seqlens, state_v_first, backend, context_parallel,
            cu_seqlens_cpu=None, needs_grad=None, checkpoints=None):
    """Validate everything and choose the path: (problem, Route). Raises on bad arguments."""
    check_options(backend, context_parallel)
    problem = validate(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu, state_v_first)
    if needs_grad is None:
        needs_grad = grad_needed(q, k, v, g, beta, initial_state)
    if checkpoints is not None:
        checkpoints.check(problem, state_v_first, q.device)
        if context_parallel not in (None, False):
            raise ValueError("`checkpoints`: taken on the unsplit walk; pass context_parallel=None or False")
        context_parallel = False

    reason = "backend='torch'"
    if backend != "torch":
        reason = _tilelang_unavailable(q, v, problem)
        if reason is None and checkpoints is not None:
            if checkpoints.buffer.dtype != q.dtype:
                reason = "state checkpoints on the kernels are stored in q's dtype"
            elif needs_grad:
                reason = "state checkpoints on the kernels take no gradients"
        if reason is None:
            plan = plan_forward(problem.seq_lens, problem.v_heads, problem.v_dim, sm_count(q.device),
                                context_parallel)
            split = backward_plan(plan, context_parallel, problem.v_heads, problem.v_dim, sm_count(q.device)) \
                if needs_grad else None
            return problem, Route(True, plan, needs_grad, backward_plan=split)
        if backend == "tilelang":
            raise RuntimeError(f"backend='tilelang' cannot run this call: {reason}")
    plan = None
    if context_parallel is not None and context_parallel is not False:   # torch path: only when asked for
        # K == V as on the kernels, so that the PyTorch path stays their specification
        if problem.k_dim != problem.v_dim:
            raise ValueError(f"`context_parallel`: needs K == V, got K={problem.k_dim}, V={problem.v_dim}")
        plan = plan_forward(problem.seq_lens, problem.v_heads, problem.v_dim, 1, context_parallel)
        plan = plan if plan.context_parallel else None
    return problem, Route(False, plan, needs_grad, reason)


def kernel_backward(q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel, cu_seqlens, state_v_first,
                    backend, context_parallel, cu_seqlens_cpu, do, dfinal):
    """The compiled op's backward on the kernels: (dq, dk, dv, dg, dbeta, dh0), or None where the
    call's route is the PyTorch path."""
    problem, route = _decide(q, k, v, g, beta, initial_state, cu_seqlens, state_v_first, backend,
                             context_parallel, cu_seqlens_cpu, True)
    if not route.kernels:
        return None
    scale = problem.k_dim ** -0.5 if scale is None else float(scale)
    return _kernel_gradients(q, k, v, g, beta, scale, initial_state, use_qk_l2norm_in_kernel, cu_seqlens,
                             problem.seq_lens, state_v_first, do, dfinal, True, route.backward_plan)


def _kernel_gradients(q, k, v, g, beta, scale, initial_state, l2norm, cu_seqlens, seq_lens, state_v_first, do,
                      dfinal, needs_dh0, plan, states=None):
    """The backward's kernels: on the plan's segments where ``plan`` is given, else unsplit; the walks'
    V tiles from the planner. ``states``: the forward's per-chunk states, or None (recomputed)."""
    walks = seq_lens if plan is None else tuple(n for _, _, n in plan.segments)
    state_tile, walk_tile = backward_tiles(tuple(walks), v.shape[2], v.shape[3], sm_count(q.device))
    if plan is not None:
        from .hopper.context_parallel_backward import hopper_cp_backward
        return hopper_cp_backward(q, k, v, g, beta, scale, initial_state, l2norm, cu_seqlens, seq_lens,
                                  state_v_first, do, dfinal, plan, needs_dh0=needs_dh0, walk_tile=walk_tile,
                                  states=states)
    from .hopper.backward import hopper_backward
    return hopper_backward(q, k, v, g, beta, scale, initial_state, l2norm, cu_seqlens, seq_lens, state_v_first,
                           do, dfinal, needs_dh0=needs_dh0, walk_tile=walk_tile, state_tile=state_tile,
                           states=states)


def grad_needed(*inputs) -> bool:
    """Whether autograd will differentiate through a call on these inputs."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)


def check_options(backend, context_parallel):
    """The arguments that are not tensors: raise on a value this call cannot honour."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend`: expected one of {BACKENDS}, got {backend!r}")
    if not (context_parallel is None or isinstance(context_parallel, bool)
            or (isinstance(context_parallel, int) and context_parallel >= 1)):
        raise ValueError(f"`context_parallel`: expected None, a bool or a positive int, got {context_parallel!r}")


def _tilelang_unavailable(q, v, problem) -> str | None:
    """Why the TileLang kernels cannot run this call, or None when they can."""
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, the kernels need a CUDA Hopper GPU"
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) != (9, 0):
        return "the kernels are built for SM90 (Hopper)"
    if q.dtype not in (torch.bfloat16, torch.float16) or v.dtype != q.dtype:
        return f"the kernels take bf16/fp16 q, k, v of one dtype, got {q.dtype} and {v.dtype}"
    try:
        from .hopper.forward import supports
    except ImportError as err:  # tilelang missing or broken
        return f"TileLang kernels unavailable ({err})"
    if not supports(problem.k_dim, problem.v_dim):
        return f"no kernel for head dims K={problem.k_dim}, V={problem.v_dim}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


class _KernelAutograd(torch.autograd.Function):
    """The kernel path under autograd: the forward's kernels, then the backward's (``hopper.backward``).
    Saved: the inputs and, where ``TUNING["forward_stores_states"]``, the state entering every chunk
    (stored by the forward as it walks, so the backward recomputes no state); the backward recomputes
    the rest."""

    @staticmethod
    def forward(ctx, forward, options, q, k, v, g, beta, initial_state):
        ctx.set_materialize_grads(False)            # an unused output's gradient stays None: no zeros read
        o, final, states = forward(q, k, v, g, beta, options.scale, initial_state)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, states)
        ctx.options = options
        ctx.has_final = final is not None
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta, initial_state, states = ctx.saved_tensors
        opt = ctx.options
        do = torch.zeros_like(v) if do is None else do
        grads = _kernel_gradients(q, k, v, g, beta, opt.scale, initial_state, opt.l2norm, opt.cu_seqlens,
                                  opt.seq_lens, opt.state_v_first, do, dfinal if ctx.has_final else None,
                                  ctx.needs_input_grad[7], opt.plan, states)
        return (None, None, *(x if needed else None for x, needed in zip(grads, ctx.needs_input_grad[2:])))


@dataclass(frozen=True)
class _BackwardOptions:
    scale: float
    l2norm: bool
    cu_seqlens: object
    seq_lens: tuple
    state_v_first: bool
    plan: Plan | None           # the segments of a context-parallel backward, or None (unsplit)


def _with_backward(kernel, needs_grad, problem, cu_seqlens, state_v_first, plan=None):
    """``kernel`` (a forward launcher taking (q, k, v, g, beta, scale, h0, *rest)), differentiable
    through the backward's kernels where the call needs gradients (on ``plan``'s segments if given)."""
    if not needs_grad:
        return kernel

    def run(q, k, v, g, beta, scale, initial_state, output_final_state, l2norm, *rest):
        options = _BackwardOptions(scale, l2norm, cu_seqlens, problem.seq_lens, state_v_first, plan)
        stores = TUNING["forward_stores_states"]

        def forward(*a):
            """(o, final state, the per-chunk states or None)."""
            out = kernel(*a, output_final_state, l2norm, *rest, save_states=stores)
            return out if stores else (*out, None)
        return _KernelAutograd.apply(forward, options, q, k, v, g, beta, initial_state)
    return run
