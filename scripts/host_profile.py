"""Where the host time of one eager forward call goes (GPU machine; the quick preset's shapes).

Per configuration:
- call: host us per call, the benchmark's host timer (``timing.host``: back-to-back calls, one sync per round,
  so the loop runs at the host's pace, not the GPU's), fastest round;
- the same for the pieces of the call: validation and planning (``api._decide``), the allocations,
  one TileLang launch through its adapter and through the entry point underneath it (``forward.entry``);
- a cProfile of many calls (top functions by own time) into ``--out``.

    python scripts/host_profile.py --out $OUT/host
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import torch

from flashdelta import chunk_gated_delta_rule
from flashdelta.bench import timing
from flashdelta.bench.configs import preset
from flashdelta.bench.inputs import make_inputs
from flashdelta.gated_delta_rule import api

CALLS = 200          # calls under cProfile


def per_call_us(fn) -> float:
    """Fastest round of the benchmark's host timer (back-to-back calls, one sync per round)."""
    return timing.host(lambda i: fn(), 1, timing.Budget(0.05, 5, 50)).min_ms * 1e3


def device_context(device):
    """What ``forward.on_device`` saves when the tensors' device is already current."""
    with torch.cuda.device(device):
        pass


def profile_config(cfg, out: Path) -> dict:
    x = make_inputs(cfg, "cuda")
    args = (x.q, x.k, x.v, x.g, x.beta)
    kw = dict(initial_state=x.h0, output_final_state=True, cu_seqlens=x.cu_seqlens, cu_seqlens_cpu=x.cu_seqlens_cpu)

    def call():
        return chunk_gated_delta_rule(*args, **kw)

    row = {"label": cfg.label}
    with torch.no_grad():
        row["path"] = api.explain(*args, **kw)
        row["call"] = per_call_us(call)
        row["decide"] = per_call_us(lambda: api._decide(*args, x.h0, x.cu_seqlens, False, "auto", None,
                                                        {"cu_seqlens_cpu": x.cu_seqlens_cpu}))
        row["empty x5"] = per_call_us(lambda: [torch.empty(16, device="cuda") for _ in range(5)])
        row["device ctx"] = per_call_us(lambda: device_context(x.q.device))
        row.update(launch_costs(x))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(CALLS):
            call()
        prof.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    (out / f"cprofile-{cfg.label.replace(' ', '_').replace('/', '-')}.txt").write_text(text.getvalue())
    return row


def launch_costs(x) -> dict:
    """One segment_windows launch (the smallest kernel) through TileLang's adapter and directly."""
    from flashdelta.gated_delta_rule.hopper.context_parallel import windows_kernel
    from flashdelta.gated_delta_rule.hopper.forward import entry
    kernel = windows_kernel()
    stats = torch.zeros(4, 8, 2, device="cuda")
    segments = torch.zeros(2, 5, dtype=torch.int32, device="cuda")     # two unused segments: a no-op launch
    spans = torch.empty(2, 8, 4, dtype=torch.int32, device="cuda")
    keep = torch.empty(2, 8, device="cuda")
    direct = entry(kernel)
    return {"launch (adapter)": per_call_us(lambda: kernel(stats, segments, spans, keep, 12.0)),
            "launch (entry)": per_call_us(lambda: direct(stats, segments, spans, keep, 12.0))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="host-profile")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [profile_config(cfg, out) for cfg in preset("quick")]
    (out / "host.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = [k for k in rows[0] if k not in ("label", "path")]
    print("| config | path | " + " | ".join(f"{k} us" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['label']} | {r['path']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
