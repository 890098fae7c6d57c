"""How to lay one forward call out over the GPU: plain Python, decided on the host, cached.

The fused forward gives each CTA one (sequence, value head, V tile) and walks its chunks in order,
so its latency is the longest sequence's chunk count times one step, and the GPU is full only when
there are enough such CTAs. When there are not, two levers help (DESIGN section 3):

- narrower V tiles: more CTAs, each step cheaper but not proportionally (K x BV GEMMs get small);
- context parallelism: cut sequences into segments of L chunks. A state-only warm-up (short windows
  for decaying heads, L steps for the others), a scan over segments, then the output pass: each only
  L steps long and HV x segments x V-tiles CTAs wide.

The planner evaluates a latency model over the candidates and picks the fastest (the per-chunk
preparation costs the same either way and is left out):

    steps(walks)  = makespan of the CTAs' walks on the SMs, each CTA to the first free SM in launch
                    order (so 192 equal walks on 132 SMs take two walks, not 1.45)  (in chunk steps)
    unsplit(BV)   = steps(sequences x HV x V/BV) * step(BV)
    CP(L, BV)     = overhead + warm-up + scan + steps(segments x HV x V/BV) * step(BV)
    warm-up       = steps(exact warm-ups, L each) * warmup_ratio * step(BV),  scan = segments per sequence * scan_step

Its constants live in ``TUNING``; they came from the benchmark command recorded there.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import lru_cache

CHUNK = 64
MAX_SEGMENTS = 65535 - 1             # the warm-up's grid z extent holds the segments and one "none" row
SIMULATED_WAVES = 8                  # beyond this many CTAs per SM the makespan is estimated, not simulated

# Latency-model constants, microseconds on an H100, fitted (scripts/fit_planner.py: the smallest
# total regret of the modelled choice against the best measured layout) to the forced layouts timed by
#   python scripts/gpu_check.py --skip-peers --tune      (tune.json; NVIDIA H100 80GB HBM3, 2026-11-26)
# Refit after each kernel change since (same command; latest on 8ac5eb1, PDL launches and the faster
# prep): the same constants win every time and pick the best layout on all 28 shapes.
TUNING = {
    "ctas_per_sm": 1,              # fused forward CTAs resident per SM (shared memory / registers)
    "step_us": {128: 3.0, 64: 2.0},  # one chunk step of the fused forward, by V tile
    "warmup_ratio": 0.5,           # a state-only step, relative to a full one
    "exact_fraction": 0.5,         # share of (segment, head) warm-ups that need M (g ~ 0 heads), x2 CTAs
    "scan_step_us": 5.0,           # one M S + R step of the segment scan
    "cp_overhead_us": 10.0,        # the warm-up plan, scan and final-state launches
    "min_segment_chunks": 4,       # shorter segments spend more on warm-up/scan than they save
    "max_segment_chunks": 64,
    # context_parallel=None lets the model choose between the unsplit and the CP forward
    "auto_context_parallel": True,
    # ... and whether the backward follows a CP forward's segments (hopper/context_parallel_backward.py).
    # Off until the GPU tests and the qwen35-bwd matrix have run it; an explicit context_parallel
    # (True or a segment length) turns it on for that call.
    "auto_backward_context_parallel": False,
    # One chunk step of the backward's serial walks by V tile, microseconds: the state recompute
    # (chunk_recurrence[save_states]) and the state-gradient walk (state_gradient). Their CTAs are laid
    # out as the unsplit forward's, so ``backward_tiles`` picks each tile by the same makespan. The
    # H100 steps measured so far (H100-bwd-parts.txt): recompute 5.3 (BV 128), walk 5.8 / 3.4 (BV 128 /
    # 64). Only the tiles the GPU tests have checked are listed: BV 64 for the recompute and BV 128 for
    # the walk join once test_backward_gpu.py::test_walk_and_recompute_tiles has passed and
    # scripts/tune_backward.py has timed them.
    "recompute_step_us": {128: 5.3},
    "walk_step_us": {64: 3.4},
    # Under autograd the forward stores the state entering every chunk for its backward (no serial
    # recompute; q's dtype, 32 KB per chunk and value head kept until the backward). Off until
    # test_backward_gpu.py's stored-state tests have run on a GPU.
    "forward_stores_states": False,
    # The decode kernel's V tile (hopper/decode.py V_TILES): 32 columns on 128 threads, as measured in
    # H100-decode.md; 8 columns on one warp (FLA's tile: many more CTAs in flight per SM) compiles and
    # waits for `python -m flashdelta.bench.decode --v-tiles 32,8` on a GPU.
    "decode_v_tile": 32,
}

# The per-chunk preparation splits a GVA group's value heads over CTAs until its grid has this many
# CTAs per SM (4 are resident at once). From ``python scripts/tune_prep.py`` (every divisor of the
# group timed on 18 shapes; NVIDIA H100 80GB HBM3, 2026-11-26): on every shape the fastest split was
# the least one reaching 3.9 CTAs per SM, or the finest where none does; a split that doubled a grid
# of 1.9 per SM was faster (up to 1.6x), one that doubled 3.9 per SM or more was 7-25% slower.
PREP_MIN_CTAS_PER_SM = 3

# fused_recurrent_gated_delta_rule on a dense state runs the decode kernel (one launch, the state read
# and written once) up to this many tokens per sequence, and the chunked forward beyond. Not fitted
# yet: a token step of the decode kernel moves the state through registers only, so it is far below
# a 64-token chunk step (~3 us) until sequences approach a chunk; the decode benchmark is to fit it.
DECODE_MAX_TOKENS = 16


@dataclass(frozen=True)
class Plan:
    v_tile: int                         # BV: V columns per CTA
    segment_chunks: int | None          # L: chunks per segment; None = no context parallelism
    segments: tuple[tuple[int, int, int], ...] = ()   # (sequence, first token, tokens) per segment

    @property
    def context_parallel(self) -> bool:
        return self.segment_chunks is not None


def estimate(seq_chunks: tuple[int, ...], v_heads: int, v_dim: int, sm_count: int,
             v_tile: int, segment_chunks: int | None) -> float:
    """Modelled latency in microseconds."""
    tuning = TUNING
    step = tuning["step_us"][v_tile]
    v_tiles = -(-v_dim // v_tile)
    slots = sm_count * tuning["ctas_per_sm"]

    def steps(lengths):
        """Chunk steps until the walks of ``lengths`` chunks, one CTA per value head and V tile, are done."""
        return makespan(lengths, v_heads * v_tiles, slots)

    longest = max(seq_chunks, default=0)
    if segment_chunks is None or segment_chunks >= longest:
        return steps(seq_chunks) * step
    L = segment_chunks
    per_seq = [-(-c // L) for c in seq_chunks]
    pieces = [min(L, c - s) for c in seq_chunks for s in range(0, c, L)]
    exact = [L] * round(2 * tuning["exact_fraction"] * (len(pieces) - len(seq_chunks)))
    warmup = steps(exact) * tuning["warmup_ratio"] * step
    scan = max(per_seq) * tuning["scan_step_us"]
    return tuning["cp_overhead_us"] + warmup + scan + steps(pieces) * step


def makespan(lengths, ctas_each: int, slots: int) -> int:
    """Steps until ``ctas_each`` CTAs per entry of ``lengths`` (in launch order) are done on ``slots``
    SMs, each CTA starting on the first SM to come free. Beyond ``SIMULATED_WAVES`` CTAs per SM: the
    longest walk or the total spread evenly, whichever is longer (within 1/8 of the schedule there,
    and planning a new shape stays well under a millisecond)."""
    if not lengths:
        return 0
    if len(lengths) * ctas_each > SIMULATED_WAVES * slots:
        return max(max(lengths), -(-sum(lengths) * ctas_each // slots))
    free = [0] * slots
    for n in lengths:
        for _ in range(ctas_each):
            heapq.heapreplace(free, free[0] + n)
    return max(free)


def plan_forward(seq_lens: tuple[int, ...], v_heads: int, v_dim: int, sm_count: int,
                 context_parallel: bool | int | None = None) -> Plan:
    """The fastest modelled layout for these per-sequence lengths (cached: repeated calls do no work).

    ``context_parallel``: None lets the model choose (if ``TUNING["auto_context_parallel"]``, else
    no split); False never splits; True always splits (best modelled segment length); an int forces
    that many chunks per segment.
    """
    # bools and ints apart in the cache key: True == 1 would otherwise share an entry with 1 chunk
    mode = context_parallel if context_parallel is None or isinstance(context_parallel, bool) else "forced"
    forced = 0 if mode != "forced" else int(context_parallel)
    return _plan(tuple(seq_lens), v_heads, v_dim, sm_count, mode, forced)


def backward_plan(forward: Plan, context_parallel: bool | int | None, v_heads: int, v_dim: int,
                  sm_count: int) -> Plan | None:
    """The segments the backward walks on: the forward's, where it split and the call asked for a
    split, or where ``TUNING["auto_backward_context_parallel"]`` lets the model choose and it
    pays (``backward_estimates``); else None (the unsplit backward)."""
    if not forward.context_parallel:
        return None
    if context_parallel is not None and context_parallel is not False:
        return forward
    if not TUNING["auto_backward_context_parallel"]:
        return None
    unsplit, split = backward_estimates(forward, v_heads, v_dim, sm_count, TUNING["forward_stores_states"])
    return forward if split < unsplit else None


@lru_cache(maxsize=256)
def backward_estimates(forward: Plan, v_heads: int, v_dim: int, sm_count: int, stored: bool) -> tuple[float, float]:
    """Modelled microseconds of the backward's serial part, (unsplit, on ``forward``'s segments):

        walks(lengths) = state-gradient walk (+ state recompute unless ``stored``) over those lengths
        unsplit        = walks(sequences)
        split          = overhead + warm-up (M where not truncated, R too unless stored)
                         + scans (1, or 2 unless stored) + 2 walks(segments)   (local, then corrected)

    with each walk's V tile from ``backward_tiles`` and the forward's warm-up constants. The per-chunk
    stages (prepare, gradients) cost the same either way and are left out."""
    tuning = TUNING
    seq_lens = [0] * (max((n for n, _, _ in forward.segments), default=-1) + 1)
    for n, _, tokens in forward.segments:
        seq_lens[n] += tokens
    pieces = tuple(tokens for _, _, tokens in forward.segments)

    def walks(lengths, count: int):
        state_tile, walk_tile = backward_tiles(lengths, v_heads, v_dim, sm_count)
        chunks = tuple(-(-n // CHUNK) for n in lengths)
        total = count * makespan(chunks, v_heads * -(-v_dim // walk_tile), sm_count) * tuning["walk_step_us"][walk_tile]
        if not stored:
            total += makespan(chunks, v_heads * -(-v_dim // state_tile), sm_count) * \
                tuning["recompute_step_us"][state_tile]
        return total

    L, bv = forward.segment_chunks, forward.v_tile
    exact = [L] * round(tuning["exact_fraction"] * len(pieces)) + ([] if stored else [L] * len(pieces))
    warmup = makespan(exact, v_heads * -(-v_dim // bv), sm_count) * tuning["warmup_ratio"] * tuning["step_us"][bv]
    per_seq = max((-(-n // (L * CHUNK)) for n in seq_lens), default=0)
    scans = per_seq * tuning["scan_step_us"] * (1 if stored else 2)
    return walks(tuple(seq_lens), 1), tuning["cp_overhead_us"] + warmup + scans + walks(pieces, 2)


@lru_cache(maxsize=256)
def backward_tiles(walk_lens: tuple[int, ...], v_heads: int, v_dim: int, sm_count: int) -> tuple[int, int]:
    """(state recompute V tile, state-gradient walk V tile) for walks over ``walk_lens`` tokens each
    (the sequences, or a context-parallel backward's segments): the modelled fastest of each, the
    wider tile on a tie (fewer CTAs doing the same work)."""
    chunks = tuple(-(-n // CHUNK) for n in walk_lens)

    def best(step_us):
        tiles = [t for t in sorted(step_us, reverse=True) if t <= max(v_dim, 64)] or [min(step_us)]
        return min(tiles, key=lambda t: makespan(chunks, v_heads * -(-v_dim // t), sm_count) * step_us[t])
    return best(TUNING["recompute_step_us"]), best(TUNING["walk_step_us"])


@lru_cache(maxsize=256)
def _plan(seq_lens, v_heads, v_dim, sm_count, context_parallel, forced) -> Plan:
    if context_parallel is None and not TUNING["auto_context_parallel"]:
        context_parallel = False
    seq_chunks = tuple(-(-n // CHUNK) for n in seq_lens)
    longest = max(seq_chunks, default=0)
    tiles = [t for t in sorted(TUNING["step_us"], reverse=True) if t <= max(v_dim, 64)]
    count = lambda L: sum(-(-c // L) for c in seq_chunks)
    if context_parallel is True or context_parallel is None:
        lengths, L = [], TUNING["min_segment_chunks"]
        while L <= TUNING["max_segment_chunks"] and (L < longest or not lengths):
            if count(L) <= MAX_SEGMENTS:              # a launch holds at most MAX_SEGMENTS segments
                lengths.append(L)
            L *= 2
        if context_parallel is None or not lengths:
            lengths = [None] + [L for L in lengths if L < longest]
    elif context_parallel is False:
        lengths = [None]
    else:
        if count(forced) > MAX_SEGMENTS:
            raise ValueError(f"context_parallel={forced} chunks per segment makes {count(forced)} segments; "
                             f"at most {MAX_SEGMENTS} fit one launch")
        lengths = [forced]
    best = min(((estimate(seq_chunks, v_heads, v_dim, sm_count, t, L), -t, L or 0) for t in tiles for L in lengths))
    v_tile, L = -best[1], best[2] or None
    return Plan(v_tile, L, _segments(seq_lens, L) if L else ())


def clear_caches():
    """Forget every cached plan (for tests and refits that change TUNING)."""
    _plan.cache_clear()
    backward_tiles.cache_clear()
    backward_estimates.cache_clear()


plan_forward.cache_clear = clear_caches


def _segments(seq_lens, segment_chunks):
    span = segment_chunks * CHUNK
    return tuple((n, start, min(span, length - start))
                 for n, length in enumerate(seq_lens) for start in range(0, length, span))


@lru_cache(maxsize=256)
def prep_heads_per_cta(num_chunks: int, qk_heads: int, v_heads: int, sm_count: int) -> int:
    """Value heads each CTA of the per-chunk preparation handles: the largest divisor of the GVA group
    that still gives ``PREP_MIN_CTAS_PER_SM`` CTAs per SM, else 1. A CTA forms its chunk's K K^T once
    and then loops over its heads, so splitting a group repeats that work; it pays only where the
    launch is too small to fill the GPU (one sequence of a few thousand tokens, few heads)."""
    group = v_heads // qk_heads
    target = PREP_MIN_CTAS_PER_SM * sm_count
    return next((per for per in range(group, 0, -1)
                 if group % per == 0 and num_chunks * (v_heads // per) >= target), 1)
