"""Times the per-chunk preparation (``chunk_matrices``) at every split of the GVA group over CTAs.

    python scripts/tune_prep.py [--out tune_prep.txt]

For each shape and each divisor ``per`` of the group (value heads per CTA), the CUDA-graph time of
``hopper.prepare`` without and with the in-kernel l2-norm, and the grid's CTAs per SM; every split
must give bitwise the outputs of the unsplit launch. ``planner.PREP_MIN_CTAS_PER_SM`` comes from
these tables; the planner's pick is marked with ``*``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdelta.bench import report, timing  # noqa: E402
from flashdelta.gated_delta_rule.hopper import forward as hopper  # noqa: E402
from flashdelta.gated_delta_rule.inputs import sm_count  # noqa: E402
from flashdelta.gated_delta_rule.planner import prep_heads_per_cta  # noqa: E402

SHAPES = [(1, 2048, 2, 8), (1, 4096, 2, 8), (1, 8192, 2, 8), (4, 2048, 2, 8), (8, 1024, 2, 8), (1, 32768, 2, 8),
          (8, 4096, 2, 8), (1, 2048, 4, 16), (1, 8192, 4, 16), (8, 4096, 4, 16), (1, 4096, 8, 32), (1, 8192, 8, 24),
          (4, 2048, 8, 24), (1, 2048, 16, 64), (1, 8192, 16, 64), (4, 8192, 16, 32), (1, 4096, 16, 32),
          (8, 1024, 16, 32)]


BUDGET = timing.Budget(seconds=0.1, min_reps=20)


def graph_us(run) -> float:
    """Median µs by CUDA-graph replay: the benchmark tool's timer."""
    return timing.graph(lambda _: run(), 1, BUDGET).median_ms * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = sm_count(dev)
    lines = [f"{torch.cuda.get_device_name(dev)}, {sms} SMs; us (graph), without / with in-kernel l2-norm"]
    for B, T, H, HV in SHAPES:
        tokens = B * T
        q, k = (F.normalize(torch.randn(tokens, H, 128, device=dev), dim=-1).bfloat16() for _ in range(2))
        g = F.logsigmoid(torch.randn(tokens, HV, device=dev)) / 16
        beta = torch.rand(tokens, HV, device=dev).sigmoid()
        _, chunks = hopper._tables((T,) * B, T, dev)
        group, pick = HV // H, prep_heads_per_cta(chunks.shape[0], H, HV, sms)
        ref, cells = None, []
        for per in [d for d in range(group, 0, -1) if group % d == 0]:
            times = []
            for l2 in (False, True):
                run = lambda: hopper.prepare(q, k, g, beta, chunks, HV, 128 ** -0.5, l2, per)  # noqa: E731
                out = run()
                if not l2:
                    ref = out if ref is None else ref
                    assert all(torch.equal(a, b) for a, b in zip(out, ref)), "a split changed the outputs"
                times.append(graph_us(run))
            ctas = chunks.shape[0] * HV // per / sms
            cells.append(f"{'*' if per == pick else ' '}{per}: {times[0]:6.1f} / {times[1]:6.1f} ({ctas:5.1f}/SM)")
        lines.append(f"{B}x{T} h{H}/{HV}  " + "  ".join(cells))
    report.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
