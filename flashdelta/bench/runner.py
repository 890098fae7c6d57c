"""One configuration end to end: inputs, first calls (compile time, code path), cross-checks, timings."""
from __future__ import annotations

import dataclasses

import torch

from . import timing
from .check import judge
from .configs import Config
from .inputs import make_inputs, num_sets
from .peers import Impl, backward_only, run
from .roofline import Rates, floor


def measure_config(cfg: Config, impls: list[Impl], device: torch.device, rates: Rates | None,
                   budget: timing.Budget, use_graph: bool) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = num_sets(cfg) if cuda else 1       # no L2 to defeat on the CPU path, and memory is slower to fill
    result = {"label": cfg.label, "config": dict(dataclasses.asdict(cfg), tokens=cfg.tokens),
              "input_sets": n, "floor": None, "impls": {}, "checks": {}}
    if rates is not None:
        f = floor(cfg, rates)
        result["floor"] = {"ms": f.seconds * 1e3, "bound": f.bound, "bytes": f.bytes, "flops": f.flops}
    sets = [make_inputs(cfg, device, seed=s) for s in range(n)]

    # First calls: compile/autotune time, the code path that really ran, and outputs to cross-check.
    outputs = {}
    for impl in impls:
        entry = result["impls"][impl.name] = {"status": "ok"}
        reason = impl.applies(cfg)
        if reason:
            entry.update(status="skipped", reason=reason)
            continue
        try:
            with impl.watch() as seen:
                outputs[impl.name], entry["first_call_s"] = timing.first_call(lambda i: run(impl, sets[i], cfg), sync)
                entry["path"] = seen()
        except Exception as err:           # a peer failing on one config is a result, not a crash
            entry.update(status="failed", reason=describe(err))
            _recover(cuda)

    result["checks"] = judge(outputs, impls[0].name)
    del outputs

    for impl in impls:
        entry = result["impls"][impl.name]
        if not impl.timed or entry["status"] != "ok":
            continue
        call = (lambda i, impl=impl: run(impl, sets[i], cfg))
        try:
            entry["eager"] = (timing.eager if cuda else timing.cpu)(call, n, budget).to_json()
        except Exception as err:
            entry.update(status="failed", reason=f"timing: {describe(err)}")
            _recover(cuda)
            continue
        if cuda:
            entry["host"] = timing.host(call, n, budget).to_json()
            entry["peak_mib"] = timing.peak_mib(lambda: call(0))
            if cfg.mode == "fwdbwd":
                backwards = [backward_only(impl, s) for s in sets]
                entry["bwd_eager"] = timing.eager(lambda i: backwards[i](), n, budget).to_json()
                del backwards
        if cuda and use_graph:
            try:
                entry["graph"] = timing.graph(call, n, budget).to_json()
            except Exception as err:       # e.g. a host sync inside the call cannot be captured
                entry["graph_error"] = describe(err)
                _recover(cuda)
    del sets
    if cuda:
        torch.cuda.empty_cache()
    return result


def describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _recover(cuda: bool) -> None:
    """Drain the device after a failure so the next measurement starts clean (best effort)."""
    if not cuda:
        return
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:                      # a sticky CUDA error: later calls will report it themselves
        pass
