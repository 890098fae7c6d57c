"""Benchmark inputs as DESIGN section 5 draws them, and how many sets to rotate through."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .configs import Config
from .roofline import traffic_bytes

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
L2_BYTES = 50 << 20             # H100 L2
MAX_SETS = 16


@dataclass
class InputSet:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    h0: torch.Tensor
    cu_seqlens: torch.Tensor | None         # int32 on the device; None for a dense batch
    cu_seqlens_cpu: torch.Tensor | None     # the same offsets on the host (spares the call a sync)
    do: torch.Tensor | None = None          # gradients flowing into o and the final state (fwd+bwd)
    dht: torch.Tensor | None = None
    l2norm: bool = False                    # q, k raw: every implementation normalises them in-kernel

    @property
    def leaves(self) -> list[torch.Tensor]:
        """The tensors gradients are taken with respect to, in report order."""
        return [self.q, self.k, self.v, self.g, self.beta, self.h0]


GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def make_inputs(cfg: Config, device: torch.device | str, seed: int = 0) -> InputSet:
    """q,k l2-normalised (raw randn with ``cfg.l2norm``: the implementations normalise them), v randn (cfg
    dtype); g = logsigmoid(randn)/16 fp32 with every fourth value head at 0 (no decay, 25% of heads);
    beta = sigmoid(rand) fp32; h0 randn fp32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = TORCH_DTYPES[cfg.dtype]
    B, T = (1, cfg.tokens) if cfg.varlen else (cfg.num_seqs, cfg.lengths[0])

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    norm = (lambda x: x) if cfg.l2norm else (lambda x: F.normalize(x, dim=-1))
    q = norm(randn(B, T, cfg.hk, cfg.k_dim)).to(dt)
    k = norm(randn(B, T, cfg.hk, cfg.k_dim)).to(dt)
    v = randn(B, T, cfg.hv, cfg.v_dim).to(dt)
    g = F.logsigmoid(randn(B, T, cfg.hv)) / 16
    g[..., ::4] = 0
    beta = torch.sigmoid(torch.rand(B, T, cfg.hv, generator=gen, device=device))
    h0 = randn(cfg.num_seqs, cfg.hv, cfg.k_dim, cfg.v_dim)
    cu = cu_cpu = None
    if cfg.varlen:
        cu_cpu = torch.tensor([0, *_cumsum(cfg.lengths)], dtype=torch.int32)
        cu = cu_cpu.to(device)
    inp = InputSet(q, k, v, g, beta, h0, cu, cu_cpu, l2norm=cfg.l2norm)
    if cfg.mode == "fwdbwd":
        for x in inp.leaves:
            x.requires_grad_(True)
        inp.do = randn(B, T, cfg.hv, cfg.v_dim).to(dt)
        inp.dht = randn(*h0.shape)
    return inp


def _cumsum(lengths):
    total = 0
    for n in lengths:
        total += n
        yield total


def num_sets(cfg: Config, l2_bytes: int = L2_BYTES) -> int:
    """Input sets to rotate through so that a timed call never finds its inputs in L2.

    One set when it alone exceeds L2; otherwise enough for the sets together to span twice L2.
    """
    size = traffic_bytes(cfg)
    return 1 if size >= l2_bytes else min(MAX_SETS, math.ceil(2 * l2_bytes / size))
