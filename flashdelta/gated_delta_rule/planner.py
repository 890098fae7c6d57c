"""How to lay one forward call out over the GPU: plain Python, decided on the host, cached.

The fused forward gives each CTA one (sequence, value head, V tile) and walks its chunks in order,
so its latency is the longest sequence's chunk count times one step, and the GPU is full only when
there are enough such CTAs. When there are not, two levers help (DESIGN section 3):

- narrower V tiles: more CTAs, each step cheaper but not proportionally (K x BV GEMMs get small);
- context parallelism: cut sequences into segments of L chunks. Two passes over the tokens (warm-up
  and output) plus a scan, but each pass only L steps long and HV x segments x V-tiles CTAs wide.

The planner evaluates a latency model over the candidates and picks the fastest:

    latency(L, BV) = passes * waves(CTAs) * L * step(BV) + (scan cost if L splits anything)

Its constants live in ``TUNING``; they came from the benchmark command recorded there.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

CHUNK = 64

# Latency-model constants; retune with:
#   python -m flashdelta.bench --preset qwen35-fwd   (on the target GPU; compare forced plans)
# Status: first estimates from the kernel's structure, not yet fitted to measurements.
TUNING = {
    "ctas_per_sm": 1,              # fused forward CTAs resident per SM (register-bound: fp32 state)
    "step_cost": {128: 1.0, 64: 0.7},  # one chunk step, relative to BV = 128 (H100: 1.52 vs 2.07 ms, 1x32768 hv8)
    "cp_passes": 2.0,              # warm-up (state-only, cheaper) + output pass, in output-pass steps
    "scan_cost_per_segment": 0.5,  # one M S + R step of the segment scan, in chunk steps
    "min_segment_chunks": 4,       # shorter segments spend more on warm-up/scan than they save
    # context_parallel=None chooses CP only when this is on. Off: the CP forward has not yet been
    # measured faster than the unsplit one (H100, 2026-11-25: 11.9 ms vs 1.8 ms at 1x32768 hv8, with
    # a since-replaced serial prefix sum; see benchmarks/results/H100-fwd.md).
    "auto_context_parallel": False,
}


@dataclass(frozen=True)
class Plan:
    v_tile: int                         # BV: V columns per CTA
    segment_chunks: int | None          # L: chunks per segment; None = no context parallelism
    segments: tuple[tuple[int, int, int], ...] = ()   # (sequence, first token, tokens) per segment

    @property
    def context_parallel(self) -> bool:
        return self.segment_chunks is not None


def _waves(ctas: int, sm_count: int, ctas_per_sm: int) -> int:
    return max(1, -(-ctas // (sm_count * ctas_per_sm)))


def estimate(seq_chunks: tuple[int, ...], v_heads: int, v_dim: int, sm_count: int,
             v_tile: int, segment_chunks: int | None, tuning=TUNING) -> float:
    """Modelled latency in chunk steps of a BV = 128 CTA."""
    step = tuning["step_cost"][v_tile]
    v_tiles = -(-v_dim // v_tile)
    longest = max(seq_chunks, default=0)
    if segment_chunks is None or segment_chunks >= longest:
        ctas = len(seq_chunks) * v_heads * v_tiles
        return _waves(ctas, sm_count, tuning["ctas_per_sm"]) * longest * step
    segments = sum(-(-c // segment_chunks) for c in seq_chunks)
    ctas = segments * v_heads * v_tiles
    scan = max(-(-c // segment_chunks) for c in seq_chunks) * tuning["scan_cost_per_segment"]
    return tuning["cp_passes"] * _waves(ctas, sm_count, tuning["ctas_per_sm"]) * segment_chunks * step + scan


@lru_cache(maxsize=256)
def plan_forward(seq_lens: tuple[int, ...], v_heads: int, v_dim: int, sm_count: int,
                 context_parallel: bool | int | None = None) -> Plan:
    """The fastest modelled layout for these per-sequence lengths (a pure function: cached).

    ``context_parallel``: None lets the model choose (if ``TUNING["auto_context_parallel"]``, else
    no split); False never splits; True always splits (best modelled segment length); an int forces
    that many chunks per segment.
    """
    if context_parallel is None and not TUNING["auto_context_parallel"]:
        context_parallel = False
    seq_chunks = tuple(-(-n // CHUNK) for n in seq_lens)
    longest = max(seq_chunks, default=0)
    tiles = [t for t in sorted(TUNING["step_cost"], reverse=True) if t <= max(v_dim, 64)]
    if context_parallel is True or context_parallel is None:
        L = TUNING["min_segment_chunks"]
        lengths = [L]
        while L * 2 < longest:
            L *= 2
            lengths.append(L)
        if context_parallel is None:
            lengths = [None] + [L for L in lengths if L < longest]
    elif context_parallel is False:
        lengths = [None]
    else:
        lengths = [int(context_parallel)]
    best = min(((estimate(seq_chunks, v_heads, v_dim, sm_count, t, L), -t, L or 0) for t in tiles for L in lengths))
    v_tile, L = -best[1], best[2] or None
    return Plan(v_tile, L, _segments(seq_lens, L) if L else ())


def _segments(seq_lens, segment_chunks):
    span = segment_chunks * CHUNK
    return tuple((n, start, min(span, length - start))
                 for n, length in enumerate(seq_lens) for start in range(0, length, span))
