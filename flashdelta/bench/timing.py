"""Timers. ``fn(i)`` runs one call on input set ``i``; sets are rotated so inputs come from HBM, not L2.

- graph: the calls over all sets captured once in a CUDA graph and replayed: kernel time, no host work.
- eager: one call started on an idle GPU, timed with CUDA events: the host work (planning, launches,
  syncs) is included because the GPU waits for it -- the latency a user sees.
- host: wall clock per call of back-to-back calls on a GPU, synchronised once per round of a few dozen:
  the launch queue never fills, so the loop runs at the host's pace whatever the kernels take. This
  is the host time a call costs its caller (an implementation that synchronises inside pays the wait).
- cpu: wall clock per call.
- peak memory: the most memory the caching allocator held during one call beyond what it held before
  (workspaces, saved activations and the call's outputs and gradients).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int

    def to_json(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float]) -> Timing:
    return Timing(statistics.median(samples_ms), min(samples_ms), max(samples_ms), len(samples_ms))


@dataclass(frozen=True)
class Budget:
    """How many repetitions: enough to fill ``seconds``, within [min_reps, max_reps]."""

    seconds: float = 0.3
    min_reps: int = 20
    max_reps: int = 500

    def reps(self, estimate_s: float) -> int:
        return max(self.min_reps, min(self.max_reps, int(self.seconds / max(estimate_s, 1e-9))))


def first_call(fn, sync) -> tuple[object, float]:
    """Result and wall time of the first call (compilation, autotuning and caches included)."""
    sync()
    start = time.perf_counter()
    out = fn(0)
    sync()
    return out, time.perf_counter() - start


def cpu(fn, n_sets: int, budget: Budget) -> Timing:
    fn(0)                                          # warm-up: allocator, thread pools
    samples = []
    reps = None
    while reps is None or len(samples) < reps:
        i = len(samples) % n_sets
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1e3)
        if reps is None:
            reps = budget.reps(samples[0] * 1e-3)
    return summarize(samples)


HOST_ROUND = 32          # calls per round: a few launches each stays far inside the GPU's launch queue


def host(fn, n_sets: int, budget: Budget) -> Timing:
    for i in range(n_sets):
        fn(i)
    torch.cuda.synchronize()
    samples = []
    reps = None
    while reps is None or len(samples) < reps:
        start = time.perf_counter()
        for j in range(HOST_ROUND):
            fn(j % n_sets)
        samples.append((time.perf_counter() - start) * 1e3 / HOST_ROUND)
        torch.cuda.synchronize()
        if reps is None:                           # the round's whole time, the GPU's included
            reps = budget.reps(time.perf_counter() - start)
    return summarize(samples)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def eager(fn, n_sets: int, budget: Budget, warmup: int = 3) -> Timing:
    for i in range(warmup):
        fn(i % n_sets)
    torch.cuda.synchronize()
    samples = []
    reps = None
    while reps is None or len(samples) < reps:
        i = len(samples) % n_sets
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()                   # idle GPU: the first event fires as the call starts
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        if reps is None:
            reps = budget.reps(samples[0] * 1e-3)
    return summarize(samples)


def graph(fn, n_sets: int, budget: Budget, warmup: int = 2) -> Timing:
    """Per-call kernel time from CUDA-graph replays of all ``n_sets`` calls (raises if capture fails)."""
    # Warm up on a side stream, as capture requires: lazy init, autotuning and host caches settle here.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for i in range(n_sets):
                fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    g = torch.cuda.CUDAGraph()
    caller = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(g):
            outputs = [fn(i) for i in range(n_sets)]   # held so the graph's output memory stays valid
    except Exception:
        # A failed capture_end skips torch.cuda.graph's restoring of the caller's stream: restore it here.
        torch.cuda.set_stream(caller)
        raise
    g.replay()
    torch.cuda.synchronize()
    samples = []
    reps = None
    while reps is None or len(samples) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n_sets)
        if reps is None:
            reps = budget.reps(samples[0] * n_sets * 1e-3)
    del outputs, g
    return summarize(samples)
