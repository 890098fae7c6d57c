"""Run each Hopper forward kernel a few times on one shape, for Nsight Compute:

    ncu --clock-control none -k regex:'chunk_' --section WarpStateStats ... python scripts/profile_kernels.py

Shape: ``--lens 8192,8192,8192,8192 --heads 16/32`` (the default, large batch x heads).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdelta.gated_delta_rule.hopper import forward as hopper  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="8192,8192,8192,8192")
    ap.add_argument("--heads", default="16/32")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    lens = [int(x) for x in args.lens.split(",")]
    H, HV = (int(x) for x in args.heads.split("/"))
    tok = sum(lens)
    q = F.normalize(torch.randn(tok, H, 128, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(tok, H, 128, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(tok, HV, 128, device="cuda").bfloat16()
    g = F.logsigmoid(torch.randn(tok, HV, device="cuda")) / 16
    beta = torch.rand(tok, HV, device="cuda").sigmoid()
    seqs, chunks = hopper._tables(tuple(lens), None, q.device)
    o = torch.empty_like(v)
    for _ in range(args.reps):
        ag, coef, _ = hopper.prepare(q, k, g, beta, chunks, HV, 128 ** -0.5, False)
        hopper.recur(q, k, v, ag, coef, seqs, None, o, None, False, 128)
    torch.cuda.synchronize()
    print("ok", torch.isfinite(o).all().item())


if __name__ == "__main__":
    main()
