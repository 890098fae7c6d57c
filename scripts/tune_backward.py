"""Times the backward's layouts on the GPU, for the planner's backward table (``planner.TUNING``).

    python scripts/tune_backward.py [--out DIR]

Per shape, CUDA-graph ms of the whole kernel backward (``hopper_backward`` / ``hopper_cp_backward``):
unsplit with every (state recompute V tile, state-gradient walk V tile) and from the states the forward
stored, context parallel on the forward planner's segments and on forced segment lengths; and the
forward alone, with and without storing its states. Writes ``tune_backward.json`` under DIR.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from flashdelta.bench import timing  # noqa: E402
from flashdelta.bench.configs import Config  # noqa: E402
from flashdelta.bench.inputs import make_inputs  # noqa: E402
from flashdelta.gated_delta_rule.hopper import backward as hb  # noqa: E402
from flashdelta.gated_delta_rule.hopper import context_parallel as hcp, forward as hf  # noqa: E402
from flashdelta.gated_delta_rule.hopper.context_parallel_backward import hopper_cp_backward  # noqa: E402
from flashdelta.gated_delta_rule.inputs import sm_count  # noqa: E402
from flashdelta.gated_delta_rule.planner import plan_forward  # noqa: E402

SHAPES = [  # (lengths, varlen, hk, hv)
    ((32768,), False, 2, 4), ((32768,), False, 4, 8), ((32768,), False, 2, 8), ((8192,), False, 2, 4),
    ((8192,), False, 16, 32), ((8192,) * 4, False, 16, 32), ((4096,) * 8, True, 4, 16), ((2048,) * 4, False, 4, 8),
    ((131072,), False, 2, 4),
]
TILES = (128, 64)
BUDGET = timing.Budget(seconds=0.15, min_reps=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sms = sm_count(torch.device("cuda"))
    rows = []
    for lens, varlen, H, HV in SHAPES:
        x = make_inputs(Config(tuple(lens), varlen, H, HV), "cuda")
        do, dht = torch.randn_like(x.v), torch.randn_like(x.h0)
        seq = tuple(lens)
        common = (x.q, x.k, x.v, x.g, x.beta, 128 ** -0.5, x.h0, False, x.cu_seqlens, seq, False, do, dht)
        ms = lambda fn: timing.graph(lambda _: fn(), 1, BUDGET).median_ms  # noqa: E731
        row = {"shape": f"{'varlen ' if varlen else ''}{len(lens)}x{lens[0]} h{H}/{HV}", "sms": sms}
        for st in TILES:
            for wt in TILES:
                row[f"unsplit S{st} W{wt}"] = ms(lambda: hb.hopper_backward(*common, walk_tile=wt, state_tile=st))
        plan = plan_forward(tuple(lens), HV, 128, sms)
        fwd_args = (x.q, x.k, x.v, x.g, x.beta, 128 ** -0.5, x.h0, True, False, x.cu_seqlens, seq, False)
        forward = (lambda **kw: hcp.hopper_cp_forward(*fwd_args, plan, **kw)) if plan.context_parallel else \
            (lambda **kw: hf.hopper_forward(*fwd_args, v_tile=plan.v_tile, **kw))
        row["fwd"] = ms(forward)
        row["fwd storing states"] = ms(lambda: forward(save_states=True))
        states = forward(save_states=True)[2]
        for wt in TILES:
            row[f"unsplit stored W{wt}"] = ms(lambda: hb.hopper_backward(*common, walk_tile=wt, states=states))
        auto = plan_forward(tuple(lens), HV, 128, sms, True)
        for name, L in (("planner", True), ("L16", 16), ("L32", 32), ("L64", 64)):
            plan = auto if L is True else plan_forward(tuple(lens), HV, 128, sms, L)
            if not plan.context_parallel:
                continue
            for wt in TILES:
                row[f"CP {name} (L={plan.segment_chunks}) W{wt}"] = ms(
                    lambda: hopper_cp_backward(*common, plan, walk_tile=wt))
                row[f"CP {name} (L={plan.segment_chunks}) stored W{wt}"] = ms(
                    lambda: hopper_cp_backward(*common, plan, walk_tile=wt, states=states))
        rows.append(row)
        best = min((v, k) for k, v in row.items() if isinstance(v, float) and not k.startswith("fwd"))
        print(row["shape"], " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)),
              f"| best {best[1]} {best[0]:.3f}", flush=True)
        del x, do, dht
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "tune_backward.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
