"""Ahead-of-time build of every Hopper kernel variant into the TileLang cache (no GPU needed).

    TILELANG_CACHE_DIR=... python -m flashdelta.compile --arch sm_90a

Prints one line per variant: name, compile seconds (builds run in parallel), and whether the
generated CUDA holds wgmma and TMA loads (and the mbarrier / setmaxnreg of warp specialisation). Exits nonzero if a variant fails to build or lacks what it needs (``required``).
"""
import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def features(source: str) -> dict[str, bool]:
    """What the generated CUDA source of a kernel uses."""
    return {
        "wgmma": "wgmma" in source,
        "tma": "tma_load" in source or "cp.async.bulk.tensor" in source,
        "tma_store": "tma_store" in source,
        "mbarrier": "mbarrier" in source or "Barrier" in source,
        "setmaxnreg": "warpgroup_reg_alloc" in source or "setmaxnreg" in source,
    }


def required(name: str) -> tuple[str, ...]:
    """Features a variant must show: the tile kernels run on wgmma, and all but the segment scan (a
    few steps per sequence, plain vector loads) stream their tiles with TMA; ``segment_windows`` is
    a scalar walk over per-chunk statistics (one thread per segment and head); ``recurrent_step``
    (decode) is vector work without matrices, its state stored by TMA."""
    if name.startswith("segment_windows"):
        return ()
    if name.startswith("recurrent_step"):
        return ("tma_store",)
    # chunk_gradients (one chunk per CTA) loads its tiles with plain vector loads for now
    return ("wgmma",) if name.startswith(("segment_scan", "chunk_gradients")) else ("wgmma", "tma")


def build_all(only: str = "", jobs: int | None = None):
    """Build every variant whose name contains ``only``, ``jobs`` at a time (TileLang compiles in
    threads; nvcc runs outside the GIL). Returns (name, seconds, source or the exception) per variant."""
    from .gated_delta_rule.hopper.forward import variants

    def one(item):
        name, build = item
        t = time.perf_counter()
        try:
            result = build().get_kernel_source()
        except Exception as err:  # reported per variant by the caller
            result = err
        return name, time.perf_counter() - t, result

    todo = [v for v in variants() if only in v[0]]
    with ThreadPoolExecutor(max(1, jobs or os.cpu_count() or 1)) as pool:
        return list(pool.map(one, todo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="only sm_90a is built")
    parser.add_argument("--only", default="", help="build only variants whose name contains this")
    parser.add_argument("--jobs", type=int, default=None, help="parallel builds (default: CPU count)")
    args = parser.parse_args(argv)
    if args.arch != "sm_90a":
        print(f"unsupported arch {args.arch}: the kernels target sm_90a", file=sys.stderr)
        return 2
    failed = 0
    for name, seconds, source in build_all(args.only, args.jobs):
        if isinstance(source, Exception):
            print(f"{name:36s} FAILED after {seconds:6.1f}s: {type(source).__name__}: {source}")
            failed += 1
            continue
        f = features(source)
        missing = [x for x in required(name) if not f[x]]
        failed += bool(missing)
        print(f"{name:36s} {seconds:6.1f}s  " + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in f.items())
              + (f"  MISSING {'/'.join(missing)}" if missing else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
