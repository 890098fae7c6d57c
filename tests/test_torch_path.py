"""The chunked PyTorch path against the float64 token loop, and its context-parallel pieces."""
import time

import pytest
import torch

from flashdelta import chunk_gated_delta_rule, naive_gated_delta_rule
from flashdelta.gated_delta_rule import context_parallel as cp
from flashdelta.gated_delta_rule.chunked import ChunkLayout, chunk_forward
from helpers import make_inputs, rel_err

EXACT = 1e-10


def both(q, k, v, g, beta, h0, **kw):
    got = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="torch", **kw)
    want = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    return got, want


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("H,HV", [(2, 2), (2, 4), (1, 4)])
@pytest.mark.parametrize("h0", [True, False])
def test_matches_naive(T, H, HV, h0):
    gen = torch.Generator().manual_seed(T * 100 + H * 10 + HV)
    q, k, v, g, beta, s0 = make_inputs(2, T, H, HV, 16, 8, h0=h0, generator=gen)
    (o, s), (o_ref, s_ref) = both(q, k, v, g, beta, s0)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert rel_err(o, o_ref) <= EXACT and rel_err(s, s_ref) <= EXACT


@pytest.mark.parametrize("lens", [[0, 5, 64, 0, 130, 1], [200], [0, 0], [64, 64]])
def test_varlen_matches_naive(lens):
    gen = torch.Generator().manual_seed(len(lens))
    T = sum(lens)
    q, k, v, g, beta, s0 = make_inputs(1, T, 2, 4, 16, 8, num_seqs=len(lens), generator=gen)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    (o, s), (o_ref, s_ref) = both(q, k, v, g, beta, s0, cu_seqlens=cu)
    assert o.shape == (1, T, 4, 8) and s.shape == (len(lens), 4, 16, 8)
    if T:
        assert rel_err(o, o_ref) <= EXACT
    assert rel_err(s, s_ref) <= EXACT
    # empty sequences hand their initial state back unchanged
    for n, length in enumerate(lens):
        if length == 0:
            assert torch.equal(s[n], s0[n])


@pytest.mark.parametrize("option", ["state_v_first", "l2norm", "zero_gates", "strong_decay", "scale"])
def test_options_match_naive(option):
    gen = torch.Generator().manual_seed(7)
    q, k, v, g, beta, s0 = make_inputs(2, 150, 2, 4, 16, 12, generator=gen,
                                       zero_gate_heads=2 if option == "zero_gates" else 0,
                                       strong_decay=option == "strong_decay")
    kw = {}
    if option == "state_v_first":
        kw["state_v_first"] = True
        s0 = s0.transpose(-1, -2).contiguous()
    if option == "l2norm":
        kw["use_qk_l2norm_in_kernel"] = True
        q, k = 3 * q, 2 * k
    if option == "scale":
        kw["scale"] = 0.3
    (o, s), (o_ref, s_ref) = both(q, k, v, g, beta, s0, **kw)
    assert s.shape == s0.shape
    assert rel_err(o, o_ref) <= EXACT and rel_err(s, s_ref) <= EXACT


def test_low_precision_inputs_give_q_dtype_and_fp32_state():
    gen = torch.Generator().manual_seed(3)
    q, k, v, g, beta, s0 = make_inputs(1, 100, 2, 2, 16, 16, generator=gen)
    o, s = chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.float(), beta.bfloat16(),
                                  initial_state=s0.half(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) < 0.01 and rel_err(s, s_ref) < 0.01


def test_no_final_state_by_default():
    q, k, v, g, beta, _ = make_inputs(1, 10, 1, 1, 8, 8, dtype=torch.float32)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta)
    assert s is None and o.shape == (1, 10, 1, 8)


def chunk_layout_inputs(T=700, HV=3, K=16, V=8, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, s0 = make_inputs(2, T, HV, HV, K, V, generator=gen, **kw)
    layout = ChunkLayout.build((T, T), T, torch.device("cpu"))
    return [layout.gather(x) for x in (q, k, v, g, beta)] + [s0]


@pytest.mark.parametrize("seg", [1, 3, 4, 11])
def test_segmented_equals_unsegmented(seg):
    q, k, v, g, beta, s0 = chunk_layout_inputs(zero_gate_heads=1)
    o, s = chunk_forward(q, k, v, g, beta, 0.25, s0)
    o_seg, s_seg = cp.segmented_forward(q, k, v, g, beta, 0.25, s0, seg)
    assert rel_err(o_seg, o) <= EXACT and rel_err(s_seg, s) <= EXACT


def test_transitions_reproduce_state_pass():
    _, k, v, g, beta, s0 = chunk_layout_inputs(T=128)
    from flashdelta.gated_delta_rule.chunked import chunk_states, chunk_transitions
    M = chunk_transitions(k, g, beta)
    R0 = chunk_states(k[..., :1, :, :], v[..., :1, :, :], g[..., :1, :], beta[..., :1, :])
    S1 = chunk_states(k[..., :1, :, :], v[..., :1, :, :], g[..., :1, :], beta[..., :1, :], s0)
    assert rel_err(M[..., 0, :, :] @ s0 + R0, S1) <= EXACT


def test_truncation_error_within_bound():
    # head 0 never decays (exact path), heads 1-2 decay quickly enough to truncate
    q, k, v, g, beta, s0 = chunk_layout_inputs(T=64 * 24, zero_gate_heads=1)
    g = g * 6
    seg = 2
    exact, _ = cp.segment_start_states(k, v, g, beta, s0, seg)
    approx, _ = cp.segment_start_states(k, v, g, beta, s0, seg, tau=cp.TRUNCATION_TAU)
    _, _, G, contractive = cp.segment_summaries(k, v, g, beta, seg)
    truncate = cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU)
    assert truncate[:, 1:].any() and not truncate[:, 0].any()
    bound = cp.truncation_bound(G, truncate, exact)
    err = (approx - exact).flatten(-2).norm(dim=-1)
    assert (err <= bound * (1 + 1e-9) + 1e-12).all()
    assert (err[:, 0] == 0).all()                        # the g = 0 head is exact
    assert (bound <= torch.exp(torch.tensor(-cp.TRUNCATION_TAU)) * exact.flatten(-2).norm(dim=-1).amax()).all()
    o_exact, _ = cp.segmented_forward(q, k, v, g, beta, 0.25, s0, seg)
    o_trunc, _ = cp.segmented_forward(q, k, v, g, beta, 0.25, s0, seg, cp.TRUNCATION_TAU)
    assert rel_err(o_trunc, o_exact) < 1e-5


def test_truncation_respects_norm_condition():
    # beta |k|^2 > 2 breaks the contraction bound: such segments must not be truncated
    _, k, v, g, beta, _ = chunk_layout_inputs(T=256)
    _, _, G, contractive = cp.segment_summaries(2 * k, v, g * 50, beta + 1, 2)
    assert not cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU).any()


@pytest.mark.parametrize("varlen", [False, True])
def test_gradients_match_naive(varlen):
    gen = torch.Generator().manual_seed(11)
    lens = [70, 0, 30]
    B, T = (1, sum(lens)) if varlen else (2, 70)
    n = len(lens) if varlen else B
    inputs = make_inputs(B, T, 1, 2, 8, 4, generator=gen, num_seqs=n)
    kw = {"cu_seqlens": torch.tensor([0, 70, 70, 100])} if varlen else {}
    grads = []
    for fn in (lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True, backend="torch", **kw),
               lambda *a: naive_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True, **kw)):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, s = fn(*xs)
        wo = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
        ws = torch.randn(s.shape, generator=torch.Generator().manual_seed(2), dtype=s.dtype)
        ((o * wo).sum() + (s * ws).sum()).backward()
        grads.append([x.grad for x in xs])
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], *grads):
        assert rel_err(a, b) <= 1e-9, name


def test_gradcheck_small():
    gen = torch.Generator().manual_seed(5)
    xs = [x.requires_grad_() for x in make_inputs(1, 70, 1, 1, 4, 3, generator=gen)]
    fn = lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True, backend="torch")
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6)


def test_cpu_speed_8k_tokens_16_heads():
    q, k, v, g, beta, s0 = make_inputs(1, 8192, 16, 16, 128, 128, dtype=torch.float32)
    start = time.perf_counter()
    with torch.no_grad():
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert time.perf_counter() - start < 10
