"""Results out: the Markdown table, the JSON record and the speed-up plot.

A result is a plain dict per configuration (see ``runner.measure_config``), so the same functions
render a finished run and a run cut short.
"""
from __future__ import annotations

import json
from pathlib import Path

from .check import REFERENCE, limit

OURS = "flashdelta"
PEERS = ("FLA", "FlashQLA", "FlashInfer")
ALWAYS_SHOWN = ("FLA", "FlashQLA")     # columns of every table; other peers where a run has them


def shown_peers(record: dict) -> tuple[str, ...]:
    return ALWAYS_SHOWN + tuple(p for p in PEERS if p not in ALWAYS_SHOWN
                                and any(p in r["impls"] for r in record["results"]))


def best_ms(impl: dict | None, kind: str) -> float | None:
    """Median ms of one timing kind ("graph" or "eager") of an implementation, if it was measured."""
    if not impl or impl.get("status") != "ok" or not impl.get(kind):
        return None
    return impl[kind]["median_ms"]


def derived(result: dict) -> dict:
    """Speed-ups of flashdelta over each peer and its fraction of the roofline floor, per timing kind."""
    ours = result["impls"].get(OURS)
    out = {"speedup": {}, "fraction_of_floor": {}}
    for peer in PEERS:
        ratios = {}
        for kind in ("graph", "eager"):
            a, b = best_ms(ours, kind), best_ms(result["impls"].get(peer), kind)
            if a and b:
                ratios[kind] = b / a
        if ratios:
            out["speedup"][peer] = ratios
    if result.get("floor"):
        for kind in ("graph", "eager"):
            t = best_ms(ours, kind)
            if t:
                out["fraction_of_floor"][kind] = result["floor"]["ms"] / t
    return out


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _cell(impl: dict | None, kinds=("graph", "eager")) -> str:
    if impl is None or impl["status"] == "skipped":
        return "skip"
    if impl["status"] == "failed":
        return "FAILED"
    return " / ".join(_ms(best_ms(impl, k)) for k in kinds)


def _ratio(r: dict | None) -> str:
    if not r:
        return "—"
    return " / ".join(f"{r[k]:.2f}x" if k in r else "—" for k in ("graph", "eager"))


def _check(result: dict) -> str:
    """E.g. "vs fp64: flashdelta ok 4.4e-03; FLA ok 4.3e-03" or "vs ours: FLA ok 6.0e-03"."""
    parts, against = [], None
    for name, c in result["checks"].items():
        against = c.get("against", OURS)       # records older than the field compared peers with ours
        if c["flagged"]:
            bad = " ".join(f"{n} {c['errors'][n]:.1e}>{limit(n, against):g}" for n in c["flagged"])
            parts.append(f"{name} MISMATCH {bad}")
        elif c["errors"]:
            parts.append(f"{name} ok {max(c['errors'].values()):.1e}")
    if not parts:
        return "—"
    return ("vs fp64: " if against == REFERENCE else "vs ours: ") + "; ".join(parts)


def _host(result: dict, names) -> str:
    """Host microseconds per call (``timing.host``), per implementation."""
    values = [best_ms(result["impls"].get(name), "host") for name in names]
    return " / ".join("—" if t is None else f"{t * 1e3:.0f}" for t in values)


def _per_impl(result: dict, show, peers) -> str:
    """``show(impl)`` for flashdelta and each peer, "—" where it did not run."""
    return " / ".join(show(result["impls"].get(name) or {}) for name in (OURS, *peers))


def _eager_over_graph(impl: dict | None) -> str:
    eager, graph = best_ms(impl, "eager"), best_ms(impl, "graph")
    return f"{eager / graph:.2f}" if eager and graph else "—"


def _first_calls(result: dict, names) -> str:
    vals = []
    for name in names:
        impl = result["impls"].get(name)
        vals.append(f"{impl['first_call_s']:.2f}" if impl and impl.get("first_call_s") is not None else "—")
    return " / ".join(vals)


def markdown(record: dict) -> str:
    """The table plus the notes a reader needs to interpret it."""
    env, results = record["environment"], record["results"]
    graph = record["settings"]["graph"]
    kinds = "graph / eager" if graph else "eager"
    peers = shown_peers(record)
    each = " / ".join(("ours", *peers))
    head = [f"config ({record['settings']['mode_label']})", f"flashdelta ms ({kinds})",
            *(f"{p} ms ({kinds})" for p in peers), *(f"{p}/ours" for p in peers), f"host us ({each})",
            "ours eager/graph", "floor ms", "floor/ours", f"first call s ({each})", "check (rel-RMS)"]
    at = 2 + 2 * len(peers)                  # where the per-implementation columns start
    with_bwd = any(best_ms(i, "bwd_eager") for r in results for i in r["impls"].values())
    if with_bwd:
        head[at:at] = [f"bwd alone ms, eager ({each})"]
    with_peak = any(i.get("peak_mib") for r in results for i in r["impls"].values())
    if with_peak:
        head[-2:-2] = [f"peak MiB ({each})"]
    lines = [f"# flashdelta benchmark: {env['device_name']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell_kinds = ("graph", "eager") if graph else ("eager",)
    for r in results:
        d = derived(r)
        floor = r.get("floor")
        frac = d["fraction_of_floor"]
        frac_kind = "graph" if "graph" in frac else "eager"
        ours = r["impls"].get(OURS) or {}
        # On a GPU, a fallback to the PyTorch path must not pass for kernel timings.
        on_gpu = record["settings"].get("cuda", graph)
        fallback = " (torch path)" if on_gpu and ours.get("path", "").startswith("torch") else ""
        row = [r["label"],
               _cell(r["impls"].get(OURS), cell_kinds) + fallback,
               *(_cell(r["impls"].get(p), cell_kinds) for p in peers),
               *(_ratio(d["speedup"].get(p)) for p in peers),
               _host(r, (OURS, *peers)),
               _eager_over_graph(ours),
               f"{_ms(floor['ms'])} ({floor['bound'][:3]})" if floor else "—",
               f"{frac[frac_kind]:.3g} ({frac_kind})" if frac else "—",
               _first_calls(r, (OURS, *peers)),
               _check(r)]
        if with_bwd:
            row[at:at] = [_per_impl(r, lambda i: _ms(best_ms(i, "bwd_eager")), peers)]
        if with_peak:
            row[-2:-2] = [_per_impl(r, lambda i: f"{i['peak_mib']:.0f}" if i.get("peak_mib") else "—", peers)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", *(f"- {note}" for note in notes(record))]
    return "\n".join(lines) + "\n"


def notes(record: dict) -> list[str]:
    env, settings = record["environment"], record["settings"]
    out = [f"{env['date']}, `{env['command']}`",
           f"device: {env['device_name']}" + (f", driver {env['driver']}" if env.get("driver") else ""),
           "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)]
    rates = record.get("rates")
    if rates:
        out.append(f"rates ({rates['source']}): copy {rates['bandwidth'] / 1e12:.2f} TB/s (read + written), "
                   f"bf16 GEMM {rates['gemm'] / 1e12:.0f} TFLOP/s; floor = max(bytes/bw, flops/rate); "
                   f"{rates['bytes_note']}; {rates['flops_note']}")
    else:
        out.append("roofline floor: not computed (no CUDA device; pass --bandwidth and --gemm-rate to get one)")
    out.append(settings["timing_note"])
    out.append("ratios: peer time / flashdelta time (graph / eager; > 1 means flashdelta is faster); "
               "floor/ours uses flashdelta's graph time where measured")
    out.append(f"check (first input set): vs fp64 = rel-RMS ||impl - ref|| / ||ref|| against the float64 token "
               f"loop, flagged above {limit('o')} (o, final state ht) or {limit('dq')} (gradients); where the "
               f"loop is too slow, vs ours = ||ours - peer|| / ||peer||, flagged above the sum of both budgets "
               f"({limit('o', OURS)} and {limit('dq', OURS)})")
    for name, reason in record["skipped"].items():
        out.append(f"{name} skipped: {reason}")
    paths = {}
    for r in record["results"]:
        for name, impl in r["impls"].items():
            if impl.get("path"):
                paths.setdefault((name, impl["path"]), []).append(r["label"])
    total = len(record["results"])
    firsts = {}
    for r in record["results"]:
        for name, impl in r["impls"].items():
            if name in (OURS, *PEERS) and impl.get("first_call_s") is not None:
                firsts.setdefault(name, []).append((impl["first_call_s"], r["label"]))
    for name, values in firsts.items():
        worst = max(values)
        out.append(f"{name} first call (compilation/autotuning included): {values[0][0]:.2f} s on the run's first "
                   f"config ({values[0][1]}), at most {worst[0]:.2f} s ({worst[1]})")
    for (name, path), labels in sorted(paths.items()):
        where = "all configs" if len(labels) == total else ", ".join(labels)
        out.append(f"{name} ran {path}: {where}")
    skips = {}
    for r in record["results"]:
        for name, impl in r["impls"].items():
            if impl["status"] == "skipped":
                skips.setdefault(name, []).append(impl["reason"])
            elif impl["status"] == "failed":
                out.append(f"{r['label']}: {name} FAILED: {impl['reason']}")
            if impl.get("graph_error"):
                out.append(f"{r['label']}: {name} CUDA-graph capture failed: {impl['graph_error']}")
    for name, reasons in skips.items():
        out.append(f"{name} not run on {len(reasons)} of {total} configs (e.g. {reasons[0]})")
    return out


def emit(text: str, out: str | None) -> None:
    """Print a script's table and, when ``out`` names a file, save it there too."""
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def write_json(record: dict, path: Path) -> None:
    full = dict(record, results=[dict(r, **derived(r)) for r in record["results"]])
    path.write_text(json.dumps(full, indent=1, default=str) + "\n")


def plot(record: dict, path: Path) -> str | None:
    """Write the PNG; returns why not when there is nothing to plot or matplotlib is missing."""
    results = record["results"]
    speed = {peer: [derived(r)["speedup"].get(peer, {}) for r in results] for peer in PEERS}
    fractions = [derived(r)["fraction_of_floor"] for r in results]
    has_speed = any(s for values in speed.values() for s in values)
    has_frac = any(fractions)
    if not (has_speed or has_frac):
        return "plot skipped: no peer timings and no roofline floor"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"

    labels = [r["label"] for r in results]
    panels = [p for p, present in (("speed", has_speed), ("floor", has_frac)) if present]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * len(labels) + 3), 4.5 * len(panels)),
                             squeeze=False)
    x = range(len(labels))
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "speed":
            series = [(f"vs {peer} ({kind})", [s.get(kind, 0) for s in speed[peer]])
                      for peer in PEERS for kind in ("graph", "eager") if any(kind in s for s in speed[peer])]
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_ylabel("speed-up of flashdelta (x)")
        else:
            series = [(f"floor / flashdelta ({kind})", [f.get(kind, 0) for f in fractions])
                      for kind in ("graph", "eager") if any(kind in f for f in fractions)]
            ax.set_ylabel("fraction of roofline floor")
        width = 0.8 / len(series)
        for j, (name, ys) in enumerate(series):
            ax.bar([i + (j - (len(series) - 1) / 2) * width for i in x], ys, width, label=name)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(f"flashdelta, {record['environment']['device_name']}, {record['settings']['mode_label']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
