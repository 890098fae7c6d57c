"""Context parallelism across GPUs with NCCL (needs 2+ Hopper GPUs; skipped elsewhere).

Each rank runs its share of one packed bf16 stream on its own GPU (kernels); outputs and input
gradients must match a single-GPU call on the whole stream within the backward's GPU tolerances."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashdelta import CPContext, chunk_gated_delta_rule
from helpers import make_inputs, rel_err
from test_distributed import _free_port, local_tokens

pytestmark = pytest.mark.gpu
H, HV, D = 2, 4, 128
# both sides carry the kernels' bf16 error against float64: twice the backward tests' budgets
TOL = {"o": 1e-2, "dq": 1.6e-2, "dk": 1.6e-2, "dv": 1.6e-2, "dg": 4e-2, "dbeta": 4e-2}


def stream(lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, _ = make_inputs(1, sum(lens), H, HV, D, D, generator=gen, h0=False, zero_gate_heads=1)
    q = torch.nn.functional.normalize(q, dim=-1)
    xs = [x.to(torch.bfloat16) for x in (q, k, v)] + [g.float(), beta.float()]
    weight = torch.randn(1, sum(lens), HV, D, generator=gen)
    return xs, weight


def _rank_main(rank, world, port, layout, lens, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        xs, weight = stream(lens)
        tok = local_tokens(sum(lens), world, rank, layout)
        local = [x[:, tok].cuda().requires_grad_() for x in xs]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        o, _ = chunk_gated_delta_rule(*local, cp_context=CPContext(layout=layout, cu_seqlens=cu))
        (o.float() * weight[:, tok].cuda()).sum().backward()
        torch.save({"o": o.detach().cpu(), "grads": [x.grad.cpu() for x in local], "tok": tok},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout,lens", [("contiguous", [8192]), ("zigzag", [3000, 5192]),
                                         ("contiguous", [1000, 6000, 1192])])
def test_ranks_equal_one_gpu(layout, lens):
    world = min(4, torch.cuda.device_count())
    if world < 2 or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs 2+ SM90 (Hopper) GPUs")
    xs, weight = stream(lens)
    full = [x.cuda().requires_grad_() for x in xs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    o, _ = chunk_gated_delta_rule(*full, cu_seqlens=cu)
    (o.float() * weight.cuda()).sum().backward()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, _free_port(), layout, lens, out), nprocs=world,
                           start_method="spawn")
        results = [torch.load(os.path.join(out, f"{r}.pt")) for r in range(world)]
    for r, res in enumerate(results):
        tok = res["tok"]
        errors = {"o": rel_err(res["o"], o.detach().cpu()[:, tok])}
        for name, grad, x in zip(("dq", "dk", "dv", "dg", "dbeta"), res["grads"], full):
            errors[name] = rel_err(grad, x.grad.cpu()[:, tok])
        assert all(errors[n] <= TOL[n] for n in errors), f"rank {r}: errors {errors}"
