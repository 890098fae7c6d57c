"""FLA's in-kernel activations of the decay and of beta, applied as the op's first step.

    use_gate_in_kernel:          g    <- -exp(A_log) * softplus(g + dt_bias)   (per value head A_log, dt_bias)
    use_beta_sigmoid_in_kernel:  beta <- sigmoid(beta), times 2 with allow_neg_eigval (beta in (0, 2))

Both are elementwise on [B, T, HV] tensors and run in float32 (float64 for float64 inputs) before the
recurrence, so every path, kernels included, sees the activated values and autograd carries their
backward to g, A_log, dt_bias and the raw beta. softplus is PyTorch's, whose threshold (x > 20: x)
is FLA's. With allow_neg_eigval, beta |k|^2 <= 2 -- the condition of the gate-driven truncation of
context parallelism -- holds for l2-normalised keys; for raw keys the planner keeps such calls unsplit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inputs import FLOAT_DTYPES


def needs_activation(use_gate_in_kernel: bool, use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool) -> bool:
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True` (as in FLA)")
    return bool(use_gate_in_kernel or use_beta_sigmoid_in_kernel)


def activate(g, beta, use_gate_in_kernel: bool, A_log, dt_bias, use_beta_sigmoid_in_kernel: bool,
             allow_neg_eigval: bool):
    """(g, beta) as the recurrence takes them; raises on a missing or malformed A_log / dt_bias."""
    act = Activation.of(g, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    return (g, beta) if act is None else act.apply(g, beta)


@dataclass(frozen=True)
class Activation:
    """The activations a call asked for, kept to be applied where the computation runs: by ``apply``
    on the PyTorch path, or inside the decode kernel (``kernel_args``), which saves a decode step the
    separate elementwise launches."""

    gate: bool
    A_log: torch.Tensor | None
    dt_bias: torch.Tensor | None
    beta_sigmoid: bool
    neg_eigval: bool

    @staticmethod
    def of(g, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval) -> "Activation | None":
        """None when nothing is to be activated; raises on malformed options as ``activate`` does."""
        if not (needs_activation(use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval)
                or A_log is not None or dt_bias is not None):
            return None
        if not use_gate_in_kernel and (A_log is not None or dt_bias is not None):
            raise ValueError("`A_log` / `dt_bias`: only used with use_gate_in_kernel=True (g is the log-decay itself)")
        if use_gate_in_kernel:
            if A_log is None:
                raise ValueError("`A_log`: required with use_gate_in_kernel=True (one value per value head)")
            heads = g.shape[-1] if isinstance(g, torch.Tensor) else None
            for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
                _check_per_head(name, x, heads, g)
        return Activation(bool(use_gate_in_kernel), A_log, dt_bias, bool(use_beta_sigmoid_in_kernel),
                          bool(allow_neg_eigval))

    def apply(self, g, beta):
        """(g, beta) activated, in float32 (float64 for float64 inputs)."""
        if self.gate:
            x = _compute(g)
            if self.dt_bias is not None:
                x = x + self.dt_bias.to(x.dtype).reshape(-1)
            g = -self.A_log.to(x.dtype).reshape(-1).exp() * F.softplus(x)
        if self.beta_sigmoid:
            beta = torch.sigmoid(_compute(beta))
            if self.neg_eigval:
                beta = 2 * beta
        return g, beta

    def kernel_args(self):
        """(A_log or None, dt_bias or None, beta_scale): the decode kernel's form (``hopper.decode``)."""
        return (self.A_log, self.dt_bias, (2.0 if self.neg_eigval else 1.0) if self.beta_sigmoid else 0.0)


def _compute(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    return x.double() if x.dtype == torch.float64 else x.float()


def _check_per_head(name: str, x, heads, g) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}`: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}`: expected a floating dtype, got {str(x.dtype).replace('torch.', '')}")
    if x.numel() != heads:
        raise ValueError(f"`{name}`: expected {heads} values (one per value head, shape [HV]), "
                         f"got shape {tuple(x.shape)}")
    if x.device != g.device:
        raise ValueError(f"`{name}`: expected device {g.device} (g's), got {x.device}")
