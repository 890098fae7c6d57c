"""Context parallelism across ranks: per-rank forward+backward time, its exchange, and FLA's CP beside it.

    torchrun --nproc-per-node 4 scripts/cp_bench.py --tokens-per-rank 8192,16384,32768 --heads 2/8,16/32
    torchrun --nproc-per-node 8 scripts/cp_bench.py --total-tokens 131072,524288 --heads 4/16

Weak scaling (``--tokens-per-rank``): each rank holds that many tokens of one sequence; strong scaling
(``--total-tokens``): one sequence of that many tokens over all ranks. Per configuration rank 0 prints
and writes (``--out``, JSON + Markdown): the slowest rank's fwd+bwd time, the same shard alone on one
GPU (no exchange: what the target compares against, at most 1.1x), the exchange alone (the all-gather
of the summaries and, in the backward, the all-reduce of their gradients) and its share, and FLA's
context parallelism (``fla.ops.cp``) on the same shards where fla is installed. On the CPU (gloo) it
runs the PyTorch path at small sizes: a smoke test of the script, not a measurement.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdelta import CPContext, chunk_gated_delta_rule  # noqa: E402
from flashdelta.gated_delta_rule.distributed import _Exchange  # noqa: E402


def timed(fn, cuda: bool, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls, every rank in step (a barrier per call)."""
    fn()
    samples = []
    for _ in range(reps):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1e3)
    return sorted(samples)[len(samples) // 2]


def shard(total: int, hk: int, hv: int, rank: int, world: int, device, dtype, seed: int = 0):
    """This rank's contiguous share of one sequence, as leaves requiring grad, and a gradient for o."""
    gen = torch.Generator(device="cpu").manual_seed(seed + rank)
    n = total // world
    q = F.normalize(torch.randn(1, n, hk, 128, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, n, hk, 128, generator=gen), dim=-1)
    v = torch.randn(1, n, hv, 128, generator=gen)
    g = F.logsigmoid(torch.randn(1, n, hv, generator=gen)) / 16
    beta = torch.rand(1, n, hv, generator=gen)
    xs = [x.to(device, dtype) for x in (q, k, v)] + [x.to(device) for x in (g, beta)]
    return [x.requires_grad_() for x in xs], torch.randn(1, n, hv, 128, generator=gen).to(device, dtype)


def measure(total: int, hk: int, hv: int, rank: int, world: int, device, dtype, reps: int) -> dict:
    cuda = device.type == "cuda"
    xs, do = shard(total, hk, hv, rank, world, device, dtype)
    ctx = CPContext(cu_seqlens=torch.tensor([0, total]))

    def ours():
        o, _ = chunk_gated_delta_rule(*xs, cp_context=ctx)
        torch.autograd.grad(o, xs, do)

    def alone():                        # the same shard, no exchange: what one GPU would do with it
        o, _ = chunk_gated_delta_rule(*xs)
        torch.autograd.grad(o, xs, do)

    summaries = torch.randn(1, hv, 128, 256, device=device, requires_grad=True)     # one part's (R | M)

    def exchange():
        out = _Exchange.apply(summaries, None)
        torch.autograd.grad(out, summaries, torch.ones_like(out))

    row = {"tokens": total, "tokens_per_rank": total // world, "hk": hk, "hv": hv, "world": world,
           "ours_ms": timed(ours, cuda, reps), "alone_ms": timed(alone, cuda, reps),
           "exchange_ms": timed(exchange, cuda, reps)}
    fla = fla_step(xs, do, total, rank, world, device)
    if fla is not None:
        row["fla_ms"] = timed(fla, cuda, reps)
    slowest = torch.tensor([row["ours_ms"], row["alone_ms"], row["exchange_ms"], row.get("fla_ms", 0.0)])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    row.update(zip(("ours_ms", "alone_ms", "exchange_ms", "fla_ms"), slowest.tolist()))
    return row


def fla_step(xs, do, total, rank, world, device):
    """FLA's CP on the same shard, or None where fla (or its CP) is not available."""
    if device.type != "cuda":
        return None
    try:
        from fla.ops.cp import build_cp_context
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla
    except Exception:
        return None
    ctx = build_cp_context(torch.tensor([0, total], device=device), group=dist.group.WORLD)

    def step():
        o, _ = fla(*xs, cu_seqlens=ctx.cu_seqlens, cp_context=ctx)
        torch.autograd.grad(o, xs, do)
    return step


def markdown(rows, device_name: str) -> str:
    lines = [f"# Context parallelism across {rows[0]['world'] if rows else 0} ranks: {device_name}", "",
             "| tokens (per rank) | hk/hv | ours ms | one GPU, same shard ms | ours / alone | exchange ms (share) "
             "| FLA CP ms | FLA / ours |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fla = r.get("fla_ms") or 0.0
        lines.append(f"| {r['tokens']} ({r['tokens_per_rank']}) | {r['hk']}/{r['hv']} | {r['ours_ms']:.3f} | "
                     f"{r['alone_ms']:.3f} | {r['ours_ms'] / r['alone_ms']:.2f}x | {r['exchange_ms']:.3f} "
                     f"({r['exchange_ms'] / r['ours_ms']:.0%}) | " + (f"{fla:.3f} | {fla / r['ours_ms']:.2f}x |"
                                                                     if fla else "- | - |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-rank", default="", help="weak scaling: comma list")
    ap.add_argument("--total-tokens", default="", help="strong scaling: comma list")
    ap.add_argument("--heads", default="2/8,16/32", help="hk/hv pairs")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    totals = [int(n) * world for n in args.tokens_per_rank.split(",") if n]
    totals += [int(n) for n in args.total_tokens.split(",") if n]
    heads = [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    rows = [measure(total, hk, hv, rank, world, device, dtype, args.reps) for total in totals for hk, hv in heads]
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU (gloo, PyTorch path)"
        text = markdown(rows, name)
        print(text)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"cp-{world}ranks.json"), "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, f"cp-{world}ranks.md"), "w") as f:
            f.write(text)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
