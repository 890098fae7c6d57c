"""FLA's in-kernel activations (use_gate_in_kernel with A_log / dt_bias, use_beta_sigmoid_in_kernel,
allow_neg_eigval): forward and gradients against the float64 token loop fed the activated values."""
import pytest
import torch
import torch.nn.functional as F

import flashdelta
from flashdelta.gated_delta_rule import api
from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule
from helpers import make_inputs, rel_err

NAMES = ("q", "k", "v", "raw_g", "raw_beta", "h0", "A_log", "dt_bias")


def _draw(seed=0, HV=4, heads_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _, _, h0 = make_inputs(1, 150, 2, HV, 16, 16, generator=gen, num_seqs=2)
    raw_g = 2 * torch.randn(1, 150, HV, generator=gen, dtype=torch.float64)
    raw_beta = 3 * torch.randn(1, 150, HV, generator=gen, dtype=torch.float64)
    A_log = heads_scale * torch.randn(HV, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(HV, generator=gen, dtype=torch.float64)
    raw_g[0, :3, 0] = 25.0 - dt_bias[0]        # past softplus's threshold: softplus(x) = x
    return [q, k, v, raw_g, raw_beta, h0, A_log, dt_bias]


def _grads(fn, inputs, seed=1):
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, s = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
        (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o, s, *(torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads))]


@pytest.mark.parametrize("neg", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_activations_forward_and_backward(neg, with_bias):
    cu = torch.tensor([0, 70, 150])
    inputs = _draw()

    def ours(q, k, v, g, beta, h0, A_log, dt_bias):
        return flashdelta.chunk_gated_delta_rule(
            q, k, v, g, beta, scale=0.25, initial_state=h0, output_final_state=True, cu_seqlens=cu,
            use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias if with_bias else None,
            use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)

    def spelled_out(q, k, v, g, beta, h0, A_log, dt_bias):
        g = -A_log.exp() * F.softplus(g + dt_bias if with_bias else g)
        beta = (2 if neg else 1) * torch.sigmoid(beta)
        return naive_gated_delta_rule(q, k, v, g, beta, scale=0.25, initial_state=h0, output_final_state=True,
                                      cu_seqlens=cu)

    got, want = _grads(ours, inputs), _grads(spelled_out, inputs)
    for name, a, b in zip(("o", "final", *NAMES), got, want):
        if name == "dt_bias" and not with_bias:
            assert a.abs().max() == 0
            continue
        assert rel_err(a, b) < 1e-10, name


def test_sigmoid_alone_and_gate_alone_match_precomputed_values():
    q, k, v, raw_g, raw_beta, h0, A_log, dt_bias = _draw(seed=3)
    g = -A_log.exp() * F.softplus(raw_g + dt_bias)
    beta = torch.sigmoid(raw_beta)
    ref = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0[:1])[0]
    alone = [flashdelta.chunk_gated_delta_rule(q, k, v, raw_g, beta, initial_state=h0[:1], use_gate_in_kernel=True,
                                               A_log=A_log, dt_bias=dt_bias)[0],
             flashdelta.chunk_gated_delta_rule(q, k, v, g, raw_beta, initial_state=h0[:1],
                                               use_beta_sigmoid_in_kernel=True)[0]]
    for o in alone:
        assert rel_err(o, ref) < 1e-12


def test_low_precision_inputs_activate_in_float32():
    q, k, v, raw_g, raw_beta, h0, A_log, dt_bias = _draw(seed=4)
    low = [x.bfloat16() for x in (q, k, v, raw_g, raw_beta)]
    o = flashdelta.chunk_gated_delta_rule(*low, use_gate_in_kernel=True, A_log=A_log.float(), dt_bias=dt_bias.bfloat16(),
                                          use_beta_sigmoid_in_kernel=True)[0]
    ref = naive_gated_delta_rule(*[x.double() for x in low[:3]],
                                 -A_log.float().double().exp() * F.softplus(low[3].double() + dt_bias.bfloat16().double()),
                                 torch.sigmoid(low[4].double()))[0]
    assert o.dtype == torch.bfloat16 and rel_err(o, ref) < 1e-2


@pytest.mark.parametrize("kw,error,match", [
    ({"use_gate_in_kernel": True}, ValueError, r"`A_log`: required with use_gate_in_kernel=True"),
    ({"use_gate_in_kernel": True, "A_log": torch.zeros(3)}, ValueError, r"`A_log`: expected 4 values .*got shape \(3,\)"),
    ({"use_gate_in_kernel": True, "A_log": torch.zeros(4), "dt_bias": torch.zeros(2, 4)}, ValueError,
     r"`dt_bias`: expected 4 values"),
    ({"use_gate_in_kernel": True, "A_log": torch.zeros(4, dtype=torch.int64)}, TypeError, r"`A_log`: expected a floating"),
    ({"use_gate_in_kernel": True, "A_log": [0.0] * 4}, TypeError, r"`A_log`: expected a torch.Tensor"),
    ({"A_log": torch.zeros(4)}, ValueError, r"only used with use_gate_in_kernel=True"),
    ({"allow_neg_eigval": True}, ValueError, r"`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`"),
])
def test_bad_activation_arguments(kw, error, match):
    q, k, v, raw_g, raw_beta, h0, _, _ = _draw()
    with pytest.raises(error, match=match):
        flashdelta.chunk_gated_delta_rule(q, k, v, raw_g, raw_beta, **kw)


def test_negative_eigenvalues_keep_unit_keys_or_stay_unsplit():
    """beta in (0, 2) keeps the truncation's condition beta |k|^2 <= 2 only for l2-normalised keys."""
    q, k, v, raw_g, raw_beta, *_ = _draw()
    opts = lambda l2, cp: api._fla_options(raw_g, raw_beta, False, cp, l2, use_beta_sigmoid_in_kernel=True,  # noqa: E731
                                           allow_neg_eigval=True)[3]
    assert opts(False, None) is False          # the planner may not split: no truncation
    assert opts(True, None) is None            # unit keys: the planner decides
    assert opts(False, 4) == 4                 # asked for explicitly: the caller's call
    assert api._fla_options(raw_g, raw_beta, False, None, False, use_beta_sigmoid_in_kernel=True)[3] is None


def test_gradients_at_decays_down_to_minus_30_a_token():
    """float32 against float64 at g in [-30, 0] (and g = 0 heads): every gradient, dg included, to ~1e-6."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g, beta, h0 = make_inputs(2, 300, 2, 4, 32, 32, generator=gen)
    g = -30 * torch.rand(g.shape, generator=gen, dtype=torch.float64)
    g[..., 0] = 0
    inputs = [q, k, v, g, beta, h0]

    def run(dtype):
        def f(q, k, v, g, beta, h0):
            o, s = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
            return o.double(), s.double()
        return _grads(f, [x.to(dtype) for x in inputs])

    got, want = run(torch.float32), run(torch.float64)
    for name, a, b in zip(("o", "final", "q", "k", "v", "g", "beta", "h0"), got, want):
        assert rel_err(a, b) < 1e-5, name
