"""Every execution mode a framework uses, on the PyTorch path (CPU): grad modes and what ``explain``
says of them, inference mode, and ``torch.compile`` through the custom ops (fullgraph, dynamic shapes,
autograd). The same ops run the kernels on a GPU: ``test_modes_gpu.py``."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flashdelta
from flashdelta import chunk_gated_delta_rule
from flashdelta.gated_delta_rule.custom_op import chunk_gated_delta_rule_bwd_op, chunk_gated_delta_rule_op
from helpers import make_inputs

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def draw(B=1, T=150, num_seqs=2, seed=0, **kw):
    xs = make_inputs(B, T, 2, 4, 16, 16, num_seqs=num_seqs, generator=torch.Generator().manual_seed(seed), **kw)
    return dict(zip(NAMES, xs))


def loss(o, s):
    return (o * o).sum() + (s.sum() if s is not None else 0)


def test_grad_modes_take_the_intended_path():
    a = draw(B=2, T=75)
    a["v"].requires_grad_()
    path = flashdelta.explain(**a)
    assert path.startswith("torch (tensors are on cpu") and path.endswith("; autograd")
    o, _ = chunk_gated_delta_rule(**a)
    assert o.requires_grad
    with torch.no_grad():
        assert not flashdelta.explain(**a).endswith("autograd")
        assert not chunk_gated_delta_rule(**a)[0].requires_grad
    with torch.inference_mode():
        assert not flashdelta.explain(**a).endswith("autograd")
        o, _ = chunk_gated_delta_rule(**a)
        assert o.is_inference() and not o.requires_grad
    frozen = {n: x.detach() for n, x in a.items()}
    assert not flashdelta.explain(**frozen).endswith("autograd")
    assert not chunk_gated_delta_rule(**frozen)[0].requires_grad


def test_inference_mode_on_inference_tensors():
    a = draw(T=300)
    expected = chunk_gated_delta_rule(**a, cu_seqlens=torch.tensor([0, 100, 300]), output_final_state=True)
    with torch.inference_mode():
        b = {n: x.clone() for n, x in a.items()}
        o, s = chunk_gated_delta_rule(**b, cu_seqlens=torch.tensor([0, 100, 300]), output_final_state=True)
    assert torch.equal(o, expected[0]) and torch.equal(s, expected[1])


def compiled(backend="aot_eager"):
    torch._dynamo.reset()           # each test compiles afresh (and the recompile limit starts over)
    counter = CompileCounterWithBackend(backend)

    def f(q, k, v, g, beta, initial_state, cu_seqlens, **kw):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens, **kw)
    return torch.compile(f, fullgraph=True, dynamic=True, backend=counter), counter


def check_against_eager(fn, a, cu=None, **kw):
    """Outputs and gradients of every input requiring grad, compiled against eager."""
    leaves = [x for x in a.values() if x is not None and x.requires_grad]
    want = chunk_gated_delta_rule(**a, cu_seqlens=cu, **kw)
    got = fn(*a.values(), cu, **kw)
    for x, y in zip(want, got):
        assert (x is None) == (y is None) and (x is None or torch.allclose(x, y, rtol=1e-12, atol=1e-12))
    if leaves:
        gw = torch.autograd.grad(loss(*want), leaves)
        gg = torch.autograd.grad(loss(*got), leaves)
        for x, y in zip(gw, gg):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_inductor_with_autograd():
    a = {n: x.requires_grad_() for n, x in draw().items()}
    fn, counter = compiled("inductor")
    check_against_eager(fn, a, torch.tensor([0, 70, 150]), output_final_state=True)
    assert counter.frame_count == 1


def test_compile_dynamic_lengths_compile_once():
    fn, counter = compiled()
    for T, cu in ((150, [0, 70, 150]), (300, [0, 10, 300]), (77, [0, 0, 77])):
        a = {n: x.requires_grad_() for n, x in draw(T=T).items()}
        check_against_eager(fn, a, torch.tensor(cu), output_final_state=True)
    for B, T in ((3, 100), (5, 64)):            # dense batches (B = 1 would be specialised): one more graph
        a = {n: x.requires_grad_() for n, x in draw(B=B, T=T, num_seqs=B).items()}
        check_against_eager(fn, a, output_final_state=True)
    assert counter.frame_count == 2


@pytest.mark.parametrize("option", [
    dict(output_final_state=False), dict(scale=0.3), dict(use_qk_l2norm_in_kernel=True),
    dict(state_v_first=True), dict(context_parallel=1), dict(h0=False), dict(frozen=("q", "k")),
    dict(frozen=("initial_state", "g", "beta")), dict(backend="torch"), dict(cu_seqlens_cpu=True)])
def test_compile_options(option):
    option = dict(option)
    a = draw(h0=option.pop("h0", True), T=200)
    if option.get("state_v_first"):
        a["initial_state"] = a["initial_state"].transpose(-1, -2).contiguous()
    frozen = option.pop("frozen", ())
    for n, x in a.items():
        if x is not None and n not in frozen:
            x.requires_grad_()
    cu = torch.tensor([0, 130, 200])
    if option.pop("cu_seqlens_cpu", False):
        option["cu_seqlens_cpu"] = cu.clone()
    option.setdefault("output_final_state", True)
    fn, _ = compiled()
    check_against_eager(fn, a, cu, **option)


def test_compile_under_no_grad_and_inference_mode():
    a = draw()
    fn, counter = compiled()
    want = chunk_gated_delta_rule(**a, output_final_state=True, cu_seqlens=torch.tensor([0, 70, 150]))
    with torch.no_grad():
        o, s = fn(*a.values(), torch.tensor([0, 70, 150]), output_final_state=True)
    assert torch.equal(o, want[0]) and torch.equal(s, want[1])
    with torch.inference_mode():
        o, s = fn(*a.values(), torch.tensor([0, 70, 150]), output_final_state=True)
    assert torch.equal(o, want[0]) and torch.equal(s, want[1])


def test_compile_keeps_argument_errors():
    fn, _ = compiled()
    a = draw(B=2, T=75)
    with pytest.raises(Exception, match="`backend`"):
        fn(*a.values(), None, backend="gpu")
    with pytest.raises(Exception, match="`chunk_size`: expected one of"):
        fn(*a.values(), None, chunk_size=100)


def test_opcheck():
    a = draw()
    h0 = a["initial_state"].requires_grad_()
    x = [a[n] for n in NAMES[:5]]
    for cu in (torch.tensor([0, 70, 150]), None):
        if cu is None:
            x = [t.reshape(2, 75, *t.shape[2:]) for t in x]
        torch.library.opcheck(chunk_gated_delta_rule_op,
                              (*x, h0, cu, None, None, True, False, False, "auto", None, True))
    do = torch.randn_like(a["v"])
    dfinal = torch.randn_like(h0)
    args = (*[a[n] for n in NAMES[:5]], h0.detach(), torch.tensor([0, 70, 150]), None, do, dfinal, None, False, False,
            "auto", None, [True, False, True, True, False, True])
    # opcheck's other checks run the real op under a checking dispatch mode, which cannot see through
    # the functorch wrappers of the vjp (torch.compile refuses such modes anyway); the compiled
    # backward tests above run this op inside real graphs, and its fake is checked here.
    torch.library.opcheck(chunk_gated_delta_rule_bwd_op, args, test_utils=("test_autograd_registration",))
    real = chunk_gated_delta_rule_bwd_op(*args)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        fake = chunk_gated_delta_rule_bwd_op(*args)
    assert [(x.shape, x.dtype) for x in real] == [(x.shape, x.dtype) for x in fake]


def test_compile_in_a_fresh_process():
    """The custom ops are imported while dynamo traces the first call (nothing registers at import)."""
    import subprocess
    import sys
    code = ("import sys, torch, flashdelta\n"
            "assert 'flashdelta.gated_delta_rule.custom_op' not in sys.modules\n"
            "x = [torch.randn(2, 100, 2, 16) for _ in range(2)] + [torch.randn(2, 100, 4, 16), -torch.rand(2, 100, 4),"
            " torch.rand(2, 100, 4)]\n"
            "f = torch.compile(flashdelta.chunk_gated_delta_rule, fullgraph=True, dynamic=True, backend='aot_eager')\n"
            "assert torch.equal(f(*x)[0], flashdelta.chunk_gated_delta_rule(*x)[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_compile_with_fla_activations_and_the_recurrent_entry():
    """FLA's gate / beta activations and fused_recurrent_gated_delta_rule inside one fullgraph compile."""
    a = {n: x.requires_grad_() for n, x in draw(B=2, T=40, num_seqs=2).items()}
    A_log = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dt_bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def step(q, k, v, g, beta, initial_state, A_log, dt_bias):
        kw = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                  allow_neg_eigval=True, use_qk_l2norm_in_kernel=True, output_final_state=True)
        o, s = chunk_gated_delta_rule(q[:, :-1], k[:, :-1], v[:, :-1], g[:, :-1], beta[:, :-1],
                                      initial_state=initial_state, **kw)
        o1, s = flashdelta.fused_recurrent_gated_delta_rule(q[:, -1:], k[:, -1:], v[:, -1:], g=g[:, -1:],
                                                            beta=beta[:, -1:], initial_state=s, **kw)
        return torch.cat([o, o1], 1), s

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(step, fullgraph=True, backend=counter)
    inputs = [*a.values(), A_log, dt_bias]
    want, got = step(*inputs), fn(*inputs)
    assert counter.frame_count == 1
    assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-12) for x, y in zip(want, got))
    gw = torch.autograd.grad(loss(*want), inputs)
    gg = torch.autograd.grad(loss(*got), inputs)
    assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(gw, gg))
