"""The staged PyTorch backward (``chunked_backward``, the kernels' specification) against autograd of
the chunked forward, in float64 on the CPU, for every option the kernels' backward takes."""
import pytest
import torch

from flashdelta.gated_delta_rule.chunked import chunked_gated_delta_rule
from flashdelta.gated_delta_rule.chunked_backward import chunked_backward
from flashdelta.gated_delta_rule.inputs import Problem
from helpers import make_inputs, rel_err

CASES = {
    "batched": dict(B=2, T=150, H=1, HV=2, varlen=False),
    "varlen-empty-and-partial": dict(B=1, T=300, H=2, HV=4, varlen=True, lens=(100, 0, 1, 199)),
    "l2norm-v-first": dict(B=1, T=200, H=1, HV=2, varlen=True, lens=(63, 137), l2=True, v_first=True),
    "no-h0-no-dht": dict(B=1, T=130, H=1, HV=1, varlen=False, h0=False, dht=False),
    "gva-4": dict(B=1, T=129, H=1, HV=4, varlen=False, strong=True),
}


@pytest.mark.parametrize("name", CASES)
def test_staged_backward_equals_autograd(name):
    c = dict(lens=None, l2=False, v_first=False, h0=True, dht=True, strong=False) | CASES[name]
    B, T, H, HV = c["B"], c["T"], c["H"], c["HV"]
    gen = torch.Generator().manual_seed(0)
    lens = c["lens"] or (T,) * B
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HV, 8, 8, generator=gen, num_seqs=len(lens), h0=c["h0"],
                                       strong_decay=c["strong"], zero_gate_heads=1)
    if c["l2"]:
        q, k = 3 * q, 2 * k
    if c["h0"] and c["v_first"]:
        h0 = h0.transpose(-1, -2).contiguous()
    problem = Problem(B, T, H, HV, 8, 8, tuple(lens))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)] + [h0.clone().requires_grad_() if c["h0"] else None]
    o, s = chunked_gated_delta_rule(*leaves[:5], 0.4, leaves[5], True, c["l2"], problem, not c["varlen"], c["v_first"])
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    dht = torch.randn(s.shape, generator=gen, dtype=s.dtype) if c["dht"] else None
    loss = (o * do).sum() + ((s * dht).sum() if dht is not None else 0)
    expected = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    got = chunked_backward(q, k, v, g, beta, 0.4, h0, c["l2"], problem, not c["varlen"], c["v_first"], do, dht)
    assert (got[5] is None) == (not c["h0"])
    for name, a, e in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), [x for x in got if x is not None], expected):
        assert rel_err(a, e) <= 1e-12, name


# Backward context parallelism (issue 16): the segmented reverse walk against the unsplit one.
from flashdelta.gated_delta_rule import context_parallel as cp  # noqa: E402
from flashdelta.gated_delta_rule.chunked import ChunkLayout  # noqa: E402
from flashdelta.gated_delta_rule.chunked_backward import state_gradient_walk  # noqa: E402


def _chunk_inputs(T, scale_g=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, _ = make_inputs(2, T, 3, 3, 16, 8, generator=gen, zero_gate_heads=1)
    do = torch.randn(2, T, 3, 8, generator=gen, dtype=torch.float64)
    dht = torch.randn(2, 3, 16, 8, generator=gen, dtype=torch.float64)
    layout = ChunkLayout.build((T, T), T, torch.device("cpu"))
    q, k, g, beta, do = (layout.gather(x) for x in (q, k, g * scale_g, beta, do))
    return q, k, g, beta, do, dht


@pytest.mark.parametrize("seg", [1, 3, 4, 11])
@pytest.mark.parametrize("with_dht", [True, False])
def test_segmented_state_gradient_walk_equals_unsplit(seg, with_dht):
    q, k, g, beta, do, dht = _chunk_inputs(700)
    dht = dht if with_dht else None
    want = state_gradient_walk(q, k, g, beta, 0.25, do, dht)
    got = cp.segmented_state_gradient_walk(q, k, g, beta, 0.25, do, dht, seg)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-12


def test_segmented_state_gradient_truncation_within_bound():
    """Strong decays: segments whose summed decay is below -tau drop M^T dS'; the error of the state
    gradient entering each segment stays within the forward's bound read backwards."""
    q, k, g, beta, do, dht = _chunk_inputs(64 * 24, scale_g=0.5)      # summed decays near -tau
    seg = 2
    exact = cp.segmented_state_gradient_walk(q, k, g, beta, 0.25, do, dht, seg)
    approx = cp.segmented_state_gradient_walk(q, k, g, beta, 0.25, do, dht, seg, tau=cp.TRUNCATION_TAU)
    M, G, contractive = cp.segment_transitions(k, g, beta, seg)
    truncate = cp.truncation_mask(G, contractive, cp.TRUNCATION_TAU)
    assert truncate[:, 1:].any() and not truncate[:, 0].any()
    # dS' entering each segment from its end, in backward order: the bound of the forward, flipped
    ends = exact[0][..., seg - 1::seg, :, :]                     # dS' of each segment's last chunk
    bound = cp.truncation_bound(G.flip(-1), truncate.flip(-1), ends.flip(-3)).flip(-1)
    err = (approx[0][..., seg - 1::seg, :, :] - ends).flatten(-2).norm(dim=-1)
    assert err.max() > 0 and (err <= bound * (1 + 1e-9) + 1e-15).all()
    assert (err[:, 0] == 0).all()                                # the g = 0 head is exact
    for a, b in zip(approx, exact):
        assert rel_err(a, b) < 1e-5
