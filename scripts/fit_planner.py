"""Fit the planner's latency-model constants to forced-layout timings (``gpu_check.py --tune``).

    python scripts/fit_planner.py tune.json [--sms 132]

Grid-searches ``planner.TUNING``'s step, warm-up, scan and overhead constants for the smallest total
regret (log of the chosen layout's measured time over the best measured one), and prints each
configuration's choice with the fitted constants.
"""
import argparse
import itertools
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashdelta.gated_delta_rule import planner  # noqa: E402


def parse(name):
    lens, heads = name.split(" ")
    return tuple(int(x) for x in lens.split("+")), int(re.search(r"hv(\d+)", heads).group(1))


def choice(lens, hv, sms, tuning):
    saved = dict(planner.TUNING)
    planner.TUNING.update(tuning)
    planner.plan_forward.cache_clear()
    try:
        plan = planner.plan_forward(lens, hv, 128, sms)
    finally:
        planner.TUNING.clear()
        planner.TUNING.update(saved)
        planner.plan_forward.cache_clear()
    return f"CP L={plan.segment_chunks} BV={plan.v_tile}" if plan.context_parallel else f"unsplit BV={plan.v_tile}"


def regret(data, sms, tuning):
    total = 0.0
    for name, entry in data.items():
        times = entry["times"]
        pick = choice(*parse(name), sms, tuning)
        total += math.log(times.get(pick, 10 * max(times.values())) / min(times.values()))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tune_json")
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args()
    data = json.load(open(args.tune_json))
    grid = {
        "step_us": [{128: s128, 64: s64} for s128 in (3.0, 3.5, 4.0) for s64 in (2.0, 2.4, 2.8)],
        "warmup_ratio": [0.5, 0.7, 0.9, 1.1],
        "scan_step_us": [2.5, 3.5, 5.0],
        "cp_overhead_us": [10.0, 30.0, 60.0, 100.0],
    }
    best = None
    for values in itertools.product(*grid.values()):
        tuning = dict(zip(grid, values))
        r = regret(data, args.sms, tuning)
        if best is None or r < best[0]:
            best = (r, tuning)
    r, tuning = best
    print(f"fitted: {tuning}  total regret {r:.3f} (geomean slowdown {math.exp(r / len(data)):.3f})")
    for name, entry in data.items():
        times = entry["times"]
        pick = choice(*parse(name), args.sms, tuning)
        b = min(times, key=times.get)
        print(f"  {name:34s} pick {pick:16s} {times[pick]:.3f}  best {b:16s} {times[b]:.3f}")


if __name__ == "__main__":
    main()
