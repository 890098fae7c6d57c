"""Execution modes on a Hopper GPU with the kernels: torch.compile (fullgraph, dynamic lengths,
autograd, CUDA graphs via mode="reduce-overhead"), the caller's current stream, another device index,
and which path each grad mode takes."""
import pytest
import torch
import torch.nn.functional as F

import flashdelta
from flashdelta import chunk_gated_delta_rule
from helpers import make_inputs

pytestmark = pytest.mark.gpu


def draw(lens, varlen=True, seed=0, device="cuda"):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    q, k, v, g, beta, h0 = make_inputs(B, T, 2, 8, 128, 128, num_seqs=len(lens),
                                       generator=torch.Generator().manual_seed(seed))
    q = F.normalize(q, dim=-1)
    xs = [x.to(device, torch.bfloat16) for x in (q, k, v)] + [x.to(device, torch.float32) for x in (g, beta, h0)]
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return xs, (offsets.to(device) if varlen else None), (offsets if varlen else None)


def call(xs, cu=None, cu_cpu=None, **kw):
    q, k, v, g, beta, h0 = xs
    return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  cu_seqlens_cpu=cu_cpu, **kw)


@pytest.mark.parametrize("context_parallel", [False, None])
def test_compiled_kernels_equal_eager_for_new_lengths(context_parallel):
    torch._dynamo.reset()
    fn = torch.compile(call, fullgraph=True, dynamic=True)
    for lens in ([3000, 1100, 64], [8192, 0, 77], [5000, 4096, 1]):
        xs, cu, cu_cpu = draw(lens, seed=len(lens) + lens[1])
        with torch.no_grad():
            assert flashdelta.explain(*xs[:5], initial_state=xs[5], cu_seqlens=cu).startswith("tilelang")
            want = call(xs, cu, cu_cpu, context_parallel=context_parallel)
            got = fn(xs, cu, cu_cpu, context_parallel=context_parallel)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_compiled_autograd_equals_eager():
    torch._dynamo.reset()
    fn = torch.compile(call, fullgraph=True, dynamic=True)
    xs, cu, cu_cpu = draw([300, 200])
    xs = [x.requires_grad_() for x in xs]
    grads = []
    for f in (call, fn):
        o, s = f(xs, cu, cu_cpu)
        grads.append(torch.autograd.grad(o.float().square().sum() + s.sum(), xs))
    for a, b in zip(*grads):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5)


def test_compiled_with_cuda_graphs():
    torch._dynamo.reset()
    fn = torch.compile(call, fullgraph=True, mode="reduce-overhead")
    for seed in range(3):                         # recorded, then replayed on new data
        xs, _, _ = draw([4096, 4096], varlen=False, seed=seed)
        with torch.no_grad():
            want = call(xs)
            got = [x.clone() for x in fn(xs)]
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_runs_on_the_current_stream():
    xs, cu, cu_cpu = draw([3000, 1100])
    with torch.no_grad():
        want = call(xs, cu, cu_cpu)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)          # if the op ran on another stream, it would read too early
            xs2 = [x.clone() for x in xs]
            got = call(xs2, cu, cu_cpu)
        torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_another_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    xs, cu, cu_cpu = draw([3000, 1100])
    ys, cu1, _ = draw([3000, 1100], device="cuda:1")
    with torch.no_grad():
        want = call(xs, cu, cu_cpu)
        got = call(ys, cu1, cu_cpu)                 # from cuda:0's context: the op follows its tensors
        with torch.cuda.device(1):
            again = call(ys, cu1, cu_cpu)
    assert got[0].device == torch.device("cuda:1")
    assert torch.equal(want[0], got[0].cpu().cuda()) and torch.equal(got[0], again[0])


def test_grad_modes_on_the_gpu():
    xs, cu, _ = draw([300, 200])
    xs[2].requires_grad_()
    assert flashdelta.explain(*xs[:5], initial_state=xs[5], cu_seqlens=cu).endswith("; TileLang backward")
    with torch.no_grad():
        assert flashdelta.explain(*xs[:5], initial_state=xs[5], cu_seqlens=cu).startswith("tilelang, unsplit")
    with torch.inference_mode():
        cu_inf = cu.clone()
        assert flashdelta.explain(*xs[:5], initial_state=xs[5], cu_seqlens=cu_inf).startswith("tilelang")
        o, _ = call(xs, cu_inf)
    assert not o.requires_grad
