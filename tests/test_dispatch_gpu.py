"""Kernel-path dispatch on a Hopper GPU: inference, and gradients through the kernels' backward."""
import pytest
import torch

import flashdelta
from helpers import make_inputs, rel_err

pytestmark = pytest.mark.gpu


def inputs(requires_grad):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    q, k, v, g, beta, h0 = make_inputs(2, 300, 2, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    xs = [x.to("cuda", torch.bfloat16) for x in (q, k, v)] + [x.to("cuda", torch.float32) for x in (g, beta, h0)]
    return [x.requires_grad_(requires_grad) for x in xs]


def call(xs, **kw):
    q, k, v, g, beta, h0 = xs
    return flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)


def test_inference_without_grad_runs_the_kernels():
    xs = inputs(requires_grad=True)
    with torch.no_grad():
        assert flashdelta.explain(*xs[:5], initial_state=xs[5]).startswith("tilelang")
        o, s = call(xs)
    assert not o.requires_grad
    assert flashdelta.explain(*[x.detach() for x in xs[:5]]).startswith("tilelang")


def test_gradients_run_the_kernels_backward():
    xs = inputs(requires_grad=True)
    path = flashdelta.explain(*xs[:5], initial_state=xs[5])
    assert path.startswith("tilelang, unsplit") and path.endswith("; TileLang backward")
    o, s = call(xs)
    (o.float().sum() + s.sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)
    kernel_grads = [x.grad for x in xs]
    for x in xs:
        x.grad = None
    o_ref, s_ref = call(xs, backend="torch")
    (o_ref.float().sum() + s_ref.sum()).backward()
    assert all(rel_err(a, x.grad) <= 2e-2 for a, x in zip(kernel_grads, xs))
