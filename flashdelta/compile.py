"""Ahead-of-time build of every Hopper kernel variant into the TileLang cache (no GPU needed).

    TILELANG_CACHE_DIR=... python -m flashdelta.compile --arch sm_90a

Prints one line per variant: name, compile seconds, and whether the generated CUDA holds wgmma and
TMA loads. Exits nonzero if a variant fails to build or lacks either.
"""
import argparse
import sys
import time


def features(source: str) -> dict[str, bool]:
    """What the generated CUDA source of a kernel uses."""
    return {
        "wgmma": "wgmma" in source,
        "tma": "tma_load" in source or "cp.async.bulk.tensor" in source,
        "mbarrier": "mbarrier" in source or "Barrier" in source,
        "setmaxnreg": "warpgroup_reg_alloc" in source or "setmaxnreg" in source,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="only sm_90a is built")
    parser.add_argument("--only", default="", help="build only variants whose name contains this")
    args = parser.parse_args(argv)
    if args.arch != "sm_90a":
        print(f"unsupported arch {args.arch}: the kernels target sm_90a", file=sys.stderr)
        return 2
    from .gated_delta_rule.hopper.forward import variants

    failed = 0
    for name, build in variants():
        if args.only not in name:
            continue
        t = time.perf_counter()
        try:
            source = build().get_kernel_source()
        except Exception as err:  # report and go on: one line per variant
            print(f"{name:36s} FAILED after {time.perf_counter() - t:6.1f}s: {type(err).__name__}: {err}")
            failed += 1
            continue
        f = features(source)
        ok = f["wgmma"] and f["tma"]
        failed += not ok
        print(f"{name:36s} {time.perf_counter() - t:6.1f}s  " + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in f.items())
              + ("" if ok else "  MISSING wgmma/TMA"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
