"""FLA's backend registry: FLA's own ``chunk_gated_delta_rule`` calls reach flashdelta's kernels.

    import flashdelta.integrations.fla
    flashdelta.integrations.fla.register()     # FLA_FLASHDELTA=0 switches it off again

FLA 0.6 picks, per call, the first enabled backend (lowest priority value) whose verifier accepts
the call, and falls back to its Triton kernels otherwise. flashdelta registers at priority 2, ahead
of FlashQLA's 3, and its verifier accepts exactly the calls flashdelta runs on its TileLang kernels
(the reason of a refusal is FLA's log line): every other call stays with the next backend.
Registering imports FLA, not CUDA or TileLang.
"""
from __future__ import annotations

BACKEND_TYPE = "flashdelta"
ENV_VAR = "FLA_FLASHDELTA"
PRIORITY = 2


def accepts(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
            state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None, cp_context=None,
            **kwargs) -> tuple[bool, str | None]:
    """(True, None) where flashdelta would run this FLA call on its kernels, else (False, why)."""
    from ..gated_delta_rule import api
    from ..gated_delta_rule.gates import needs_activation
    if cp_context is not None:
        return False, "cp_context calls stay with FLA here (flashdelta.chunk_gated_delta_rule takes them directly)"
    activation = {name: kwargs.pop(name, None) for name in ("use_gate_in_kernel", "A_log", "dt_bias")}
    try:
        # The activations keep g's and beta's shapes: the route is decided on the raw ones, at no device work.
        needs_activation(activation["use_gate_in_kernel"], use_beta_sigmoid_in_kernel, allow_neg_eigval)
        _, _, state_v_first, _ = api._fla_options(g, beta, state_v_first, None, use_qk_l2norm_in_kernel, **kwargs)
        _, route = api._decide(q, k, v, g, beta, initial_state, cu_seqlens, state_v_first, "auto", None,
                               cu_seqlens_cpu)
    except (TypeError, ValueError, NotImplementedError) as err:
        return False, f"flashdelta refuses the arguments: {err}"
    if not route.kernels:
        return False, f"flashdelta would run its PyTorch path: {route.reason}"
    return True, None


def run(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False,
        use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
        cu_seqlens_cpu=None, chunk_indices=None, cp_context=None, **kwargs):
    from ..gated_delta_rule.api import chunk_gated_delta_rule
    return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                  use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                                  state_v_first, cu_seqlens, cu_seqlens_cpu, chunk_indices, cp_context, **kwargs)


def register() -> None:
    """Add flashdelta to FLA's ``gated_delta_rule`` backends (idempotent: it replaces itself)."""
    from fla.backends import BaseBackend, register as fla_register

    class FlashDeltaBackend(BaseBackend):
        """flashdelta's TileLang kernels (Hopper), forward and backward. Disable with FLA_FLASHDELTA=0."""

        backend_type = BACKEND_TYPE
        package_name = "flashdelta"
        env_var = ENV_VAR
        default_enable = True
        priority = PRIORITY

        def chunk_gated_delta_rule_verifier(self, *args, **kwargs):
            return accepts(*args, **kwargs)

        def chunk_gated_delta_rule(self, *args, **kwargs):
            return run(*args, **kwargs)

    fla_register("gated_delta_rule")(FlashDeltaBackend)
