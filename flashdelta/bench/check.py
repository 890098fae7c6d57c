"""Output agreement between flashdelta and another implementation, before anything is timed."""
from __future__ import annotations

import torch

# FLA's own test tolerances (rel-RMS): outputs and states tight, gradients looser.
LIMITS = {"o": 0.005, "ht": 0.005}
GRAD_LIMIT = 0.02


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = actual.detach().double(), expected.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def limit(name: str) -> float:
    return LIMITS.get(name, GRAD_LIMIT)


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """rel-RMS of every tensor both produced, ours against theirs."""
    return {name: rel_rms(ours[name], theirs[name]) for name in ours
            if theirs.get(name) is not None and ours[name] is not None}


def flagged(errors: dict[str, float]) -> list[str]:
    """Names whose error exceeds its limit (NaN counts as exceeding)."""
    return [name for name, err in errors.items() if not err <= limit(name)]
