"""Planner decisions on the host: representative shapes, SM counts, segment bookkeeping."""
import pytest

from flashdelta.gated_delta_rule import planner
from flashdelta.gated_delta_rule.planner import CHUNK, plan_forward


@pytest.fixture(autouse=True)
def auto_cp(monkeypatch):
    """These tests exercise the latency model's choices, so let it choose CP."""
    monkeypatch.setitem(planner.TUNING, "auto_context_parallel", True)
    plan_forward.cache_clear()
    yield
    plan_forward.cache_clear()


def test_auto_cp_can_be_switched_off(monkeypatch):
    assert planner.TUNING["auto_context_parallel"]          # on by default: measured faster (NOTES.md)
    monkeypatch.setitem(planner.TUNING, "auto_context_parallel", False)
    plan_forward.cache_clear()
    assert not plan_forward((32768,), 8, 128, 132).context_parallel
    assert plan_forward((32768,), 8, 128, 132, context_parallel=True).context_parallel


@pytest.mark.parametrize("seq_lens,hv,want", [
    ((32768,), 8, (128, 32)), ((8192,), 8, (64, 16)), ((2048,), 8, (64, 8)), ((32768,), 16, (128, 64)),
    ((32768,), 64, (64, None)), ((2048,) * 4, 32, (128, None)), ((8192,) * 4, 8, (128, 32)),
    ((8192,) * 4, 16, (64, None)), ((8192,) * 4, 32, (128, None))])
def test_fitted_choices(seq_lens, hv, want):
    """The best measured layouts of the tuning run (H100, 132 SMs) that the fitted model reproduces."""
    plan = plan_forward(seq_lens, hv, 128, 132)
    assert (plan.v_tile, plan.segment_chunks) == want


def test_segment_count_fits_one_launch():
    plan = plan_forward((64 * 4,) * 70000, 1, 128, 132, context_parallel=True)
    assert not plan.context_parallel                # 70000 segments would not fit: unsplit
    with pytest.raises(ValueError, match="context_parallel"):
        plan_forward((64 * 4,) * 70000, 1, 128, 132, context_parallel=1)
    # the warm-up launch has one grid row per segment plus the "none" row, 65535 at most
    assert len(plan_forward((64,) * 65534, 1, 128, 132, context_parallel=1).segments) == 65534
    with pytest.raises(ValueError, match="context_parallel"):
        plan_forward((64,) * 65535, 1, 128, 132, context_parallel=1)


@pytest.mark.parametrize("seq_lens,hv", [((8192,) * 4, 32), ((4096,) * 8, 32), ((4096,) * 8, 64), ((8192,) * 4, 64)])
def test_full_gpu_runs_fused(seq_lens, hv):
    plan = plan_forward(seq_lens, hv, 128, 132)
    assert not plan.context_parallel and plan.v_tile == 128 and plan.segments == ()


@pytest.mark.parametrize("seq_lens,hv", [((32768,), 8), ((32768,), 16), ((16384,), 8), ((28672, 4096), 8)])
def test_few_heads_long_sequences_use_cp(seq_lens, hv):
    plan = plan_forward(seq_lens, hv, 128, 132)
    assert plan.context_parallel
    ctas = len(plan.segments) * hv * (128 // plan.v_tile)
    assert ctas >= 132 // 2            # the split fills (most of) the GPU


def test_fewer_sms_mean_longer_segments():
    big = plan_forward((32768,), 8, 128, 132)
    small = plan_forward((32768,), 8, 128, 64)
    assert small.segment_chunks > big.segment_chunks
    # on very few SMs the doubled work of CP does not pay
    assert not plan_forward((32768,), 8, 128, 8).context_parallel


def test_short_sequences_never_split():
    plan = plan_forward((128,) * 2, 2, 128, 132)
    assert not plan.context_parallel


def test_cp_can_be_forced_either_way():
    assert not plan_forward((32768,), 8, 128, 132, context_parallel=False).context_parallel
    assert plan_forward((8192,) * 4, 32, 128, 132, context_parallel=True).context_parallel
    forced = plan_forward((8192,) * 4, 32, 128, 132, context_parallel=16)
    assert forced.segment_chunks == 16 and len(forced.segments) == 4 * 8


@pytest.mark.parametrize("seq_lens", [(32768,), (28672, 4096), (0, 20000, 1, 64 * 33)])
def test_segments_tile_each_sequence(seq_lens):
    plan = plan_forward(seq_lens, 4, 128, 132)
    assert plan.context_parallel
    span = plan.segment_chunks * CHUNK
    for n, length in enumerate(seq_lens):
        mine = [(s, t) for m, s, t in plan.segments if m == n]
        assert sum(t for _, t in mine) == length
        assert all(s % span == 0 and 0 < t <= span for s, t in mine)
        assert [s for s, _ in mine] == sorted(s for s, _ in mine)


def test_plans_are_cached():
    assert plan_forward((5000, 7000), 8, 128, 132) is plan_forward((5000, 7000), 8, 128, 132)


def test_true_and_one_chunk_are_different_requests():
    auto = plan_forward((32768,), 8, 128, 132, context_parallel=True)
    one = plan_forward((32768,), 8, 128, 132, context_parallel=1)
    assert auto.segment_chunks != 1 and one.segment_chunks == 1


def test_makespan_counts_whole_waves():
    # one CTA walks its whole sequence: 192 equal walks on 132 SMs take two walks, not 1.45
    assert planner.makespan([128] * 4, 48, 132) == 256
    assert planner.makespan([128] * 4, 24, 132) == 128
    # CTAs start on the first SM to come free, in launch order
    assert planner.makespan([10, 1, 1, 1], 1, 2) == 10
    assert planner.makespan([1, 1, 1, 10], 1, 2) == 11
    assert planner.makespan([], 4, 132) == 0
    # far beyond the SMs: the even spread (the simulation's bound there)
    assert planner.makespan([64] * 1000, 32, 132) == -(-64 * 1000 * 32 // 132)


def test_one_wave_of_wide_tiles_beats_two_of_narrow():
    # 4 x 24 heads: 96 CTAs of V tile 128 fill one wave; V tile 64 makes 192, two waves on 132 SMs
    assert plan_forward((8192,) * 4, 24, 128, 132).v_tile == 128


@pytest.mark.parametrize("num_chunks, hk, hv, want", [
    (32, 2, 8, 1),       # 1 x 2048 tokens: 64 CTAs unsplit, 256 at one head each
    (64, 2, 8, 1),       # 1 x 4096: 512 CTAs at one head
    (128, 2, 8, 2),      # 1 x 8192: 512 CTAs at two heads; one head would make 1024
    (512, 2, 8, 4),      # 1 x 32768: the whole group, 1024 CTAs
    (128, 4, 16, 4),
    (32, 16, 64, 4),
    (128, 8, 24, 3),     # a group of 3: divisors only
    (16, 8, 24, 1),
    (4, 16, 16, 1),      # hk = hv: one head per CTA whatever the grid
])
def test_prep_splits_groups_only_to_fill_the_gpu(num_chunks, hk, hv, want):
    per = planner.prep_heads_per_cta(num_chunks, hk, hv, 132)
    assert per == want and (hv // hk) % per == 0


def test_prep_split_follows_the_sm_count():
    assert planner.prep_heads_per_cta(128, 2, 8, 132) == 2
    assert planner.prep_heads_per_cta(128, 2, 8, 66) == 4
    assert planner.prep_heads_per_cta(128, 2, 8, 264) == 1


def test_backward_tiles_fill_the_gpu_before_narrowing(monkeypatch):
    from flashdelta.gated_delta_rule import planner
    from flashdelta.gated_delta_rule.planner import backward_tiles
    monkeypatch.setitem(planner.TUNING, "recompute_step_us", {128: 5.3, 64: 3.4})
    monkeypatch.setitem(planner.TUNING, "walk_step_us", {128: 5.8, 64: 3.4})
    backward_tiles.cache_clear()
    # 128 walks (4 sequences x 32 heads) fill 132 SMs at BV 128; BV 64 would take two waves
    assert backward_tiles((8192,) * 4, 32, 128, 132) == (128, 128)
    # 8 walks leave the GPU idle: BV 64 doubles the CTAs and shortens each step
    assert backward_tiles((32768,), 8, 128, 132) == (64, 64)
    # a context-parallel backward's segments count as walks
    assert backward_tiles((2048,) * 16, 8, 128, 132) == (128, 128)
    # a narrow V takes the narrowest tile there is
    assert backward_tiles((700,), 2, 8, 132) == (64, 64)
    backward_tiles.cache_clear()


def test_backward_tiles_only_from_the_table():
    from flashdelta.gated_delta_rule.planner import TUNING, backward_tiles
    backward_tiles.cache_clear()
    state_tile, walk_tile = backward_tiles((8192,) * 4, 32, 128, 132)
    assert state_tile in TUNING["recompute_step_us"] and walk_tile in TUNING["walk_step_us"]


@pytest.mark.parametrize("stored", [False, True])
def test_backward_split_where_the_walks_are_long_and_few(monkeypatch, stored):
    """The model splits the backward of one long sequence over few heads (its walk is the whole
    sequence, on a few SMs) and keeps it whole where the sequences already fill the GPU."""
    from flashdelta.gated_delta_rule import planner
    monkeypatch.setitem(planner.TUNING, "auto_backward_context_parallel", True)
    monkeypatch.setitem(planner.TUNING, "forward_stores_states", stored)
    plan_forward.cache_clear()
    long = plan_forward((32768,), 4, 128, 132, 32)
    assert planner.backward_plan(long, None, 4, 128, 132) is long
    wide = plan_forward((8192,) * 4, 32, 128, 132, 32)
    assert planner.backward_plan(wide, None, 32, 128, 132) is None
    unsplit, split = planner.backward_estimates(long, 4, 128, 132, stored)
    assert split < unsplit / 3
    monkeypatch.setitem(planner.TUNING, "auto_backward_context_parallel", False)
    assert planner.backward_plan(long, None, 4, 128, 132) is None          # off: never split unasked
    plan_forward.cache_clear()
