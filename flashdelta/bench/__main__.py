"""``python -m flashdelta.bench`` / ``flashdelta-bench``: flashdelta against FLA (Triton) and FlashQLA.

Examples::

    flashdelta-bench                      # the quick preset (no preset or shapes given)
    flashdelta-bench --preset qwen35-fwd --heads 2/8,16/32
    flashdelta-bench --preset qwen35-bwd --cold-cache
    flashdelta-bench --lengths 28672,4096 --batch 4 --seqlen 8192 --heads 16/32 --mode fwdbwd
    flashdelta-bench --merge bench-out/H100-fwd-a.json bench-out/H100-fwd-b.json --name H100-fwd
    flashdelta-bench --rerun benchmarks/results/H100-fwd.json --below 1.03 --name H100-fwd-rerun
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from . import configs

TIMING_NOTES = {
    "cuda": "timing: median over many runs; graph = CUDA-graph replay (kernel time), eager = one call on an "
            "idle GPU timed with CUDA events (host work included); inputs rotated over several sets when one "
            "fits in L2; first call = wall time of the first call of each configuration (compilation included); "
            "host us = wall time per call of back-to-back calls synchronised once per 32 (the launch queue never "
            "fills, so it is the host's own cost per call); ours eager/graph = what the host path adds to an "
            "idle-GPU call",
    "cpu": "timing: no CUDA device, so flashdelta's PyTorch path on CPU, eager wall-clock medians of a few "
           "runs; GPU peers skipped",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flashdelta-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    what = p.add_argument_group("configurations (a preset, or custom shapes)")
    what.add_argument("--preset", choices=configs.PRESETS, help="default: quick, unless custom shapes are given")
    what.add_argument("--lengths", action="append", default=[], metavar="N,N,...",
                      help="packed variable-length sequences (cu_seqlens), e.g. 4096,4096; repeatable")
    what.add_argument("--batch", type=int, help="dense batch of --batch sequences of --seqlen tokens")
    what.add_argument("--seqlen", type=int)
    what.add_argument("--heads", help="hk/hv pairs, e.g. 16/32,2/8 (with a preset: keep only these)")
    what.add_argument("--hk", type=int, help="q/k heads (with --hv; alternative to --heads)")
    what.add_argument("--hv", type=int, help="value heads")
    what.add_argument("-K", "--k-dim", type=int, default=128)
    what.add_argument("-V", "--v-dim", type=int, default=128)
    what.add_argument("--dtype", choices=configs.DTYPES, default="bf16", help="q, k, v dtype")
    what.add_argument("--mode", choices=configs.MODES, help="fwd (default) or fwdbwd (forward + backward)")
    what.add_argument("--max-tokens", type=int, help="drop configurations with more tokens")
    what.add_argument("--l2norm", action="store_true",
                      help="raw q, k normalised inside every implementation (use_qk_l2norm_in_kernel=True)")
    what.add_argument("--rerun", metavar="JSON", help="the configurations of an earlier run's JSON where FlashQLA "
                                                      "/ flashdelta is below --below (confirming close rows)")
    what.add_argument("--below", type=float, default=1.03, help="with --rerun: the ratio bound (default 1.03)")

    who = p.add_argument_group("implementations")
    who.add_argument("--peers", default="fla,flashqla,flashinfer",
                     help="comma list of fla, flashqla, flashinfer (each skipped with a reason where it is not "
                          "installed); 'none' for none")
    who.add_argument("--backend", choices=("auto", "tilelang", "torch"), default="auto",
                     help="flashdelta backend (default auto)")
    who.add_argument("--reference-max-tokens", type=int, default=4096,
                     help="also check against the float64 token loop up to this many tokens, a quarter of "
                          "that with the backward (0: never)")

    how = p.add_argument_group("measurement")
    how.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    how.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing")
    how.add_argument("--budget", type=float, help="seconds per measurement (default 0.3 on CUDA, 1 on CPU)")
    how.add_argument("--reps", type=int, help="exact repetitions per measurement (overrides --budget)")
    how.add_argument("--bandwidth", type=float, metavar="TB/s", help="use this copy bandwidth instead of measuring")
    how.add_argument("--gemm-rate", type=float, metavar="TFLOP/s", help="use this bf16 GEMM rate instead of measuring")
    how.add_argument("--cold-cache", action="store_true",
                     help="fresh empty TileLang and Triton cache dirs, so first calls include compilation")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="bench-out", help="results directory (default bench-out/)")
    out.add_argument("--name", help="file stem (default <GPU>-<mode>, e.g. H100-fwd)")
    out.add_argument("--merge", nargs="+", metavar="JSON",
                     help="measure nothing: join earlier runs' JSON files (a matrix split over several runs) "
                          "into one table, JSON and plot under --out/--name")
    return p.parse_args(argv)


def build_configs(args) -> list[configs.Config]:
    heads = configs.parse_heads(args.heads) if args.heads else None
    if (args.hk is None) != (args.hv is None):
        raise ValueError("--hk and --hv go together")
    if args.hk is not None:
        heads = (heads or []) + [(args.hk, args.hv)]
    if args.rerun:
        if args.preset or args.lengths or args.seqlen or args.batch:
            raise ValueError("--rerun takes its configurations from the JSON: no --preset or custom shapes")
        record = json.loads(Path(args.rerun).read_text())
        chosen = configs.restrict(configs.from_results(record, "FlashQLA", args.below), heads, args.max_tokens)
    elif args.preset or not (args.lengths or args.seqlen or args.batch):
        preset = args.preset or "quick"
        if args.lengths or args.seqlen or args.batch:
            raise ValueError("--preset and custom shapes (--lengths/--batch/--seqlen) exclude each other")
        if args.mode and preset != "quick":
            raise ValueError(f"--mode is fixed by preset {preset}")
        chosen = configs.restrict(configs.preset(preset, args.mode), heads, args.max_tokens)
    else:
        if heads is None:
            raise ValueError("custom shapes need --heads or --hk/--hv")
        chosen = configs.restrict(configs.custom(args.lengths, args.batch, args.seqlen, heads, args.k_dim,
                                                 args.v_dim, args.dtype, args.mode or "fwd"),
                                  max_tokens=args.max_tokens)
    if not chosen:
        raise ValueError("no configuration left to run")
    if args.l2norm:
        chosen = [dataclasses.replace(c, l2norm=True) for c in chosen]
    return chosen


def cold_cache() -> str:
    """Point TileLang and Triton at fresh cache dirs; must run before either is imported to be sure."""
    root = tempfile.mkdtemp(prefix="flashdelta-bench-cache-")
    os.environ["TILELANG_CACHE_DIR"] = os.path.join(root, "tilelang")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(root, "triton")
    loaded = [m for m in ("tilelang", "triton") if m in sys.modules]
    warn = f" (warning: {', '.join(loaded)} already imported)" if loaded else ""
    return f"cold cache: TILELANG_CACHE_DIR and TRITON_CACHE_DIR under {root}{warn}"


class _Progress:
    """tqdm when installed, else a line per configuration."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="config", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.done = total, 0

    def start(self, label: str):
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str):
        (self.bar.write if self.bar is not None else print)(text)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def merge(files: list[str], out_dir: Path, stem: str) -> int:
    from . import report
    records = [json.loads(Path(f).read_text()) for f in files]
    devices = {r["environment"]["device_name"] for r in records}
    if len(devices) > 1:
        print(f"flashdelta-bench: error: results from different devices {sorted(devices)}", file=sys.stderr)
        return 2
    first = records[0]
    merged = dict(first, results=[res for r in records for res in r["results"]],
                  skipped={k: v for r in records for k, v in r["skipped"].items()},
                  environment=dict(first["environment"],
                                   command=" ; ".join(r["environment"]["command"] for r in records)))
    merged["settings"] = dict(first["settings"], mode_label="+".join(
        dict.fromkeys(r["settings"]["mode_label"] for r in records)), merged_from=files)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(merged, out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(report.markdown(merged))
    print(report.markdown(merged))
    print(report.plot(merged, out_dir / f"{stem}.png") or f"plot: {out_dir / f'{stem}.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.name or "merged")
    try:
        chosen = build_configs(args)
    except ValueError as err:
        print(f"flashdelta-bench: error: {err}", file=sys.stderr)
        return 2
    messages = [cold_cache()] if args.cold_cache else []

    # Everything that may import TileLang or Triton comes after the cache dirs are set.
    import torch

    from . import report, roofline, timing
    from .environment import environment, short_name
    from .peers import FLATriton, FlashDelta, FlashInfer, FlashQLA, Naive, requested
    from .runner import measure_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        messages.append("No CUDA device: timing flashdelta's PyTorch path on CPU (eager only, fewer runs); "
                        "FLA and FlashQLA need a GPU and are skipped.")
    if args.reps:
        budget = timing.Budget(0.0, args.reps, args.reps)
    elif cuda:
        budget = timing.Budget(args.budget or 0.3)
    else:
        budget = timing.Budget(args.budget or 1.0, min_reps=3, max_reps=20)

    try:
        wanted = requested(args.peers)
    except ValueError as err:
        print(f"flashdelta-bench: error: {err}", file=sys.stderr)
        return 2
    impls, skipped = [FlashDelta(args.backend)], {}
    impls[0].load(device)
    candidates = [(FLATriton(), "fla" in wanted), (FlashQLA(), "flashqla" in wanted),
                  (FlashInfer(), "flashinfer" in wanted),
                  (Naive(args.reference_max_tokens), True)]
    for impl, on in candidates:
        reason = impl.load(device) if on else "not requested (--peers)"
        if reason is None:
            impls.append(impl)
        else:
            skipped[impl.name] = reason
            messages.append(f"{impl.name} skipped: {reason}")

    rates = None
    if args.bandwidth and args.gemm_rate:
        rates = roofline.Rates(args.bandwidth * 1e12, args.gemm_rate * 1e12, "given")
    elif cuda:
        rates = roofline.measure(device)
    if rates is not None:
        messages.append(f"copy bandwidth {rates.bandwidth / 1e12:.2f} TB/s, bf16 GEMM {rates.gemm / 1e12:.0f} "
                        f"TFLOP/s ({rates.source})")

    env = environment(device, "flashdelta-bench " + shlex.join(argv))
    modes = sorted({c.mode for c in chosen})
    mode_label = "+".join("fwd+bwd" if m == "fwdbwd" else m for m in modes)
    record = {"environment": env,
              "settings": {"mode_label": mode_label, "cuda": cuda, "graph": cuda and not args.no_graph,
                           "timing_note": TIMING_NOTES["cuda" if cuda else "cpu"],
                           "backend": args.backend, "cold_cache": args.cold_cache,
                           "budget": dataclasses.asdict(budget),
                           "implementations": [i.name for i in impls]},
              "rates": None if rates is None else {**vars(rates), "bytes_note": roofline.BYTES_NOTE,
                                                   "flops_note": roofline.FLOPS_NOTE},
              "skipped": skipped, "results": []}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{short_name(env['device_name'])}-{'-'.join(modes)}"
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}

    for line in messages:
        print(line)
    print(f"{len(chosen)} configuration(s) on {env['device_name']}: {', '.join(i.name for i in impls)}")
    progress = _Progress(len(chosen))
    for cfg in chosen:
        progress.start(cfg.label)
        result = measure_config(cfg, impls, device, rates, budget, use_graph=record["settings"]["graph"])
        record["results"].append(result)
        for name, check in result["checks"].items():
            if check["flagged"]:
                progress.write(f"MISMATCH {cfg.label}: {name} vs {check['against']}: "
                               + ", ".join(f"{n} {check['errors'][n]:.2e}" for n in check["flagged"]))
        # Written after every configuration, so a run cut short still leaves its numbers.
        report.write_json(record, paths["json"])
        paths["md"].write_text(report.markdown(record))
        progress.step()
    progress.close()

    print()
    print(report.markdown(record))
    why_not = report.plot(record, paths["png"])
    print(why_not or f"plot: {paths['png']}")
    print(f"table: {paths['md']}\njson: {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
