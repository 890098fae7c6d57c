"""Roofline floor per configuration: the least time any implementation could need on this GPU.

floor = max(bytes / copy bandwidth, flops / bf16 GEMM rate), both rates measured here (DESIGN section 5).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from .configs import Config

# Forward FLOPs per token and value head at K = V = 128 (DESIGN section 5); the backward adds 2.5x.
FWD_FLOPS_PER_TOKEN_HEAD = 164e3
BWD_FLOPS_FACTOR = 2.5
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
STATE_BYTES = 4                 # the recurrent state is fp32
GATE_BYTES = 4 + 4              # g and beta, fp32, per token and value head

BYTES_NOTE = ("bytes = compulsory HBM traffic: q,k,v,g,beta read and o written once "
              "(= (512*(hk+hv) + 8*hv) per token at bf16, K=V=128), plus h0 read and the final state written; "
              "fwd+bwd adds the backward's own reads (q,k,v,g,beta,do,h0,dht) and writes (dq,dk,dv,dg,dbeta,dh0)")
FLOPS_NOTE = ("flops = 164e3 per token per value head (scaled by K*V/128^2), x3.5 with the backward")


def traffic_bytes(cfg: Config) -> int:
    """Bytes that must cross HBM at least once (see BYTES_NOTE)."""
    e = ELEMENT_BYTES[cfg.dtype]
    qk = 2 * cfg.hk * cfg.k_dim * e                   # q and k
    vo = cfg.hv * cfg.v_dim * e                       # v, or o, or do, or dv: one value-sized tensor
    gates = GATE_BYTES * cfg.hv
    state = cfg.num_seqs * cfg.hv * cfg.k_dim * cfg.v_dim * STATE_BYTES
    fwd = (qk + 2 * vo + gates) * cfg.tokens + 2 * state
    if cfg.mode == "fwd":
        return fwd
    # backward: reads q,k,v,g,beta,do and writes dq,dk,dv,dg,dbeta; reads h0, dht and writes dh0
    bwd = (2 * qk + 3 * vo + 2 * gates) * cfg.tokens + 3 * state
    return fwd + bwd


def flops(cfg: Config) -> float:
    per_head = FWD_FLOPS_PER_TOKEN_HEAD * cfg.k_dim * cfg.v_dim / (128 * 128)
    total = per_head * cfg.tokens * cfg.hv
    return total * (1 + BWD_FLOPS_FACTOR) if cfg.mode == "fwdbwd" else total


@dataclass(frozen=True)
class Rates:
    """Measured (or given) machine rates."""

    bandwidth: float        # bytes / s (read + written)
    gemm: float             # FLOP / s
    source: str             # "measured" or "given"


@dataclass(frozen=True)
class Floor:
    seconds: float
    bound: str              # "memory" or "compute"
    bytes: int
    flops: float


def floor(cfg: Config, rates: Rates) -> Floor:
    b, f = traffic_bytes(cfg), flops(cfg)
    t_mem, t_math = b / rates.bandwidth, f / rates.gemm
    return Floor(max(t_mem, t_math), "memory" if t_mem >= t_math else "compute", b, f)


def _median_event_ms(fn, reps: int) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(device: torch.device, copy_mib: int = 1024, gemm_n: int = 8192, reps: int = 20) -> Rates:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 GEMM rate on a CUDA device."""
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        src = torch.empty(copy_mib << 20, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = _median_event_ms(lambda: dst.copy_(src), reps)
        bandwidth = 2 * src.numel() / (ms * 1e-3)
        del src, dst
        a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
        b = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(a)
        ms = _median_event_ms(lambda: torch.mm(a, b, out=out), reps)
        gemm = 2 * gemm_n ** 3 / (ms * 1e-3)
        del a, b, out
        torch.cuda.empty_cache()
    return Rates(bandwidth, gemm, "measured")
