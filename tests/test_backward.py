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
