"""Why a configuration misses a speed target: our measured time against what our own passes must move.

    python scripts/explain_results.py benchmarks/results/H100-fwd-hv16.json \
        benchmarks/results/H100-fwd-hv16-rerun.json --target 1.5 [--out table.md]

Later files replace earlier files' rows of the same label (a rerun over its matrix). For every
configuration below ``--target`` x FlashQLA it prints the time the target needs (FlashQLA's / target),
the DRAM traffic of the passes our kernels run for it (``pass_bytes``, below) and that traffic's time
at the run's measured copy rate, and so which kind of change would close the gap:

- "bytes": the target needs our passes' traffic at more than ``--bytes-bound`` of the copy rate over
  the whole call (default 80%: the most any of our calls reaches, 8x4096 h16/16, is 81%); only a design
  that moves less (Ag formed where it is used, fewer context-parallel passes) can reach it;
- "latency": the target leaves room at the copy rate, but our passes run at a fraction of it (chains of
  dependent chunk steps, launch and CTA start-up); shorter chains or more overlap would close it.

The traffic model follows the kernels (NOTES.md): prep reads k, g, beta (q too with the in-kernel
l2-norm) and writes Ag and eight fp32 row factors per token and value head; the recurrence reads q, k
once per q/k head (the GVA group's CTAs share them through L2), v, Ag, the factors, and writes o; the
states are fp32. Context parallelism adds the warm-up (value heads without decay walk whole segments:
the benchmark's inputs zero every fourth head's gate; the others walk ~4-chunk windows, g ~ -0.05 per
token against tau = 12), the scan's state reads and writes, and the output pass's start states.
"""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashdelta.bench import report  # noqa: E402

CHUNK = 64
STATE = 128 * 128 * 4              # one fp32 K x V state
EXACT_FRACTION = 0.25              # the benchmark's heads with g = 0 (flashdelta/bench/inputs.py)
WINDOW_CHUNKS = 4                  # a decaying head's warm-up window at the benchmark's gates


def pass_bytes(cfg: dict, segment_chunks: int | None, l2norm: bool = False) -> dict[str, float]:
    """DRAM bytes of each of our passes for one configuration (K = V = 128, 2-byte q/k/v)."""
    T, hk, hv, N = cfg["tokens"], cfg["hk"], cfg["hv"], len(cfg["lengths"])
    qk_row, v_row = 128 * 2, 128 * 2
    per_head = v_row + CHUNK * 2 + 8 * 4               # v, Ag, the row factors: per token and value head
    prep = T * hk * qk_row * (2 if l2norm else 1) + T * hv * (8 + CHUNK * 2 + 8 * 4)
    recurrence = T * hk * 2 * qk_row + T * hv * (per_head + v_row)
    if segment_chunks is None:
        return {"prep": prep, "recurrence": recurrence + 2 * N * hv * STATE}
    chunks = [math.ceil(n / CHUNK) for n in cfg["lengths"]]
    segments = sum(math.ceil(c / segment_chunks) for c in chunks)
    inner = segments - N                               # segments whose end state the scan reads
    inner_tokens = sum((math.ceil(c / segment_chunks) - 1) * segment_chunks * CHUNK for c in chunks)
    exact = hv * EXACT_FRACTION
    warmup = (inner_tokens * (exact * per_head + hk * qk_row)
              + inner * WINDOW_CHUNKS * CHUNK * (hv - exact) * per_head
              + inner * (hv + exact) * STATE)           # R of every head, M of the exact ones
    scan = inner * (hv + exact) * STATE + N * hv * STATE + (inner + N) * hv * STATE
    output = recurrence + segments * hv * STATE + N * hv * STATE
    return {"prep": prep, "warm-up": warmup, "scan": scan, "output pass": output}


def segment_chunks_of(path: str) -> int | None:
    found = re.search(r"segments of (\d+) chunks", path)
    return int(found.group(1)) if found else None


def rows(paths: list[str]):
    merged, rate = {}, None
    for path in paths:
        record = json.loads(Path(path).read_text())
        rate = record["rates"]["bandwidth"]                      # bytes / s, read + written
        for result in record["results"]:
            merged[result["label"]] = result
    return merged, rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    ap.add_argument("--target", type=float, default=1.5, help="FlashQLA / ours the target asks for")
    ap.add_argument("--bytes-bound", type=float, default=0.8,
                    help="share of the copy rate beyond which a target counts as needing fewer bytes")
    ap.add_argument("--out")
    args = ap.parse_args()
    results, rate = rows(args.json)
    lines = [f"copy rate {rate / 1e12:.2f} TB/s; target {args.target}x FlashQLA (CUDA graph times)", "",
             "| config | our path | ours ms | FlashQLA / ours | target ms | our passes MB | at copy rate ms "
             "| ours at % of copy rate | target needs % | closes it |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        ours = r["impls"]["flashdelta"]["graph"]["median_ms"]
        fq = r["impls"]["FlashQLA"]["graph"]["median_ms"]
        if fq / ours >= args.target:
            continue
        path = r["impls"]["flashdelta"]["path"]
        L = segment_chunks_of(path)
        moved = sum(pass_bytes(r["config"], L, r["config"].get("l2norm", False)).values())
        at_rate = moved / rate * 1e3
        target = fq / args.target
        kind = "bytes" if at_rate > args.bytes_bound * target else "latency"
        short = f"CP L={L}" if L else "unsplit"
        lines.append(f"| {label} | {short} | {ours:.3f} | {fq / ours:.2f} | {target:.3f} | {moved / 1e6:.0f} "
                     f"| {at_rate:.3f} | {100 * at_rate / ours:.0f}% | {100 * at_rate / target:.0f}% | {kind} |")
    report.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
