"""Output agreement, checked before anything is timed.

Where the float64 token loop fits (``--reference-max-tokens``), every implementation, flashdelta
included, is judged against it with FLA's own tolerances. Elsewhere each peer is compared with
flashdelta, and the bar is the sum of the two error budgets: two bf16 implementations each within
0.005 of the truth may be 0.01 apart (measured: each about 4.4e-3 from float64, 6e-3 from each other).
"""
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


REFERENCE = "naive-fp64"
PEER_FACTOR = 2          # peer against flashdelta: both error budgets


def limit(name: str, against: str = REFERENCE) -> float:
    return LIMITS.get(name, GRAD_LIMIT) * (1 if against == REFERENCE else PEER_FACTOR)


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """rel-RMS of every tensor both produced, ours against theirs."""
    return {name: rel_rms(ours[name], theirs[name]) for name in ours
            if theirs.get(name) is not None and ours[name] is not None}


def flagged(errors: dict[str, float], against: str = REFERENCE) -> list[str]:
    """Names whose error exceeds its limit (NaN counts as exceeding)."""
    return [name for name, err in errors.items() if not err <= limit(name, against)]


def judge(outputs: dict[str, dict[str, torch.Tensor]], ours: str) -> dict[str, dict]:
    """Per implementation: what it was compared with, its errors and the names above the bar. Against
    the float64 reference when it ran (every implementation), else against ``ours`` (each peer)."""
    against = REFERENCE if REFERENCE in outputs else ours
    truth = outputs.get(against)
    if truth is None:
        return {}
    checks = {}
    for name, out in outputs.items():
        if name != against:
            errors = compare(out, truth) if against == REFERENCE else compare(truth, out)
            checks[name] = {"against": against, "errors": errors, "flagged": flagged(errors, against)}
    return checks
