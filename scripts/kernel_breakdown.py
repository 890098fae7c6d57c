"""Per-kernel GPU time of flashdelta, FLA Triton and FlashQLA on the same inputs (torch profiler).

    python scripts/kernel_breakdown.py --shape 4x8192 --heads 16/32 --shape 1x32768 --heads 2/8

Each ``--shape`` pairs with the ``--heads`` at the same position; varlen shapes are written
``4096+4096``. Prints, per implementation, each kernel's mean time per call (µs) and the sum; the
full profiler tables go to ``--out`` when given. Tells where a peer is faster, kernel by kernel.
"""
import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ["FLA_FLASH_QLA"] = "0"

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from flashdelta.bench import peers, report  # noqa: E402
from flashdelta.bench.configs import Config, parse_lengths  # noqa: E402
from flashdelta.bench.inputs import make_inputs  # noqa: E402


def config(shape: str, heads: str) -> Config:
    hk, hv = (int(x) for x in heads.split("/"))
    if "x" in shape:
        b, t = (int(x) for x in shape.split("x"))
        return Config((t,) * b, False, hk, hv)
    return Config(parse_lengths(shape), True, hk, hv)


def kernel_times(impl, inp, reps: int) -> dict[str, float]:
    with torch.no_grad():
        for _ in range(3):
            impl(inp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                impl(inp)
            torch.cuda.synchronize()
    times = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name[:70]] += ev.device_time / reps
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", required=True)
    ap.add_argument("--heads", action="append", required=True)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peers", default="fla,flashqla", help="comma list of fla, flashqla (or none)")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    wanted = peers.requested(args.peers)
    impls = [peers.FlashDelta()] + [p for p in (peers.FLATriton(), peers.FlashQLA()) if p.name.lower() in wanted]
    impls = [i for i in impls if i.load(dev) is None]
    lines = []
    for shape, heads in zip(args.shape, args.heads):
        cfg = config(shape, heads)
        inp = make_inputs(cfg, dev)
        for impl in impls:
            times = kernel_times(impl, inp, args.reps)
            lines.append(f"== {cfg.label}  {impl.name}: {sum(times.values()):8.1f} us in {len(times)} kernels")
            lines += [f"   {us:8.1f}  {name}" for name, us in times.items() if us >= 0.5]
    report.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
