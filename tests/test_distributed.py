"""Context parallelism across processes (``cp_context``): 2-4 gloo ranks on the CPU, float64.

Each rank runs its share of one packed token stream; the outputs and the gradients of its inputs must
equal the matching slices of a single-process call on the whole stream."""
import os
import socket
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashdelta import CPContext, chunk_gated_delta_rule
from flashdelta.gated_delta_rule.distributed import chain_of
from helpers import make_inputs, rel_err

H, HV, D = 1, 2, 8
NAMES = ("q", "k", "v", "g", "beta")


def stream(lens, zero_gate_heads=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = make_inputs(1, sum(lens), H, HV, D, D, generator=gen, h0=False, zero_gate_heads=zero_gate_heads)[:5]
    weight = torch.randn(1, sum(lens), HV, D, generator=gen, dtype=torch.float64)
    return xs, weight


def local_tokens(T, world, rank, layout):
    if layout == "contiguous":
        n = T // world
        return torch.arange(rank * n, (rank + 1) * n)
    n = T // (2 * world)
    back = 2 * world - 1 - rank
    return torch.cat([torch.arange(rank * n, (rank + 1) * n), torch.arange(back * n, (back + 1) * n)])


def _rank_main(rank, world, port, layout, lens, zero_gate_heads, l2norm, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        xs, weight = stream(lens, zero_gate_heads)
        tok = local_tokens(sum(lens), world, rank, layout)
        local = [x[:, tok].clone().requires_grad_() for x in xs]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        ctx = CPContext(layout=layout, cu_seqlens=cu)
        o, _ = chunk_gated_delta_rule(*local, cp_context=ctx, use_qk_l2norm_in_kernel=l2norm)
        (o * weight[:, tok]).sum().backward()
        torch.save({"o": o.detach(), "grads": [x.grad for x in local], "tok": tok},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, layout, lens, zero_gate_heads=0, l2norm=False):
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world, _free_port(), layout, lens, zero_gate_heads, l2norm, out),
                           nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out, f"{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("world,layout,lens,zero_gate_heads,l2norm", [
    (2, "contiguous", [256], 0, False),                  # one sequence over both ranks
    (4, "contiguous", [100, 300, 40, 72], 1, True),      # varlen: sequences crossing up to three ranks, g = 0 head
    (2, "zigzag", [512], 1, False),                      # zigzag: parts 0 and 3 on rank 0
    (3, "zigzag", [96, 200, 40, 24], 0, False),          # varlen zigzag over 6 parts
])
def test_sharded_equals_single_process(world, layout, lens, zero_gate_heads, l2norm):
    xs, weight = stream(lens, zero_gate_heads)
    full = [x.clone().requires_grad_() for x in xs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, _ = chunk_gated_delta_rule(*full, cu_seqlens=cu, use_qk_l2norm_in_kernel=l2norm)
    (o * weight).sum().backward()
    for r, res in enumerate(run_ranks(world, layout, lens, zero_gate_heads, l2norm)):
        tok = res["tok"]
        assert rel_err(res["o"], o.detach()[:, tok]) < 1e-10, f"rank {r}: o"
        for name, grad, x in zip(NAMES, res["grads"], full):
            assert rel_err(grad, x.grad[:, tok]) < 1e-10, f"rank {r}: d{name}"


def test_chain_of_fla_context_fields():
    """FLA's FLACPContext is read by its fields: a contiguous rank inside one sequence, a zigzag rank."""
    fla_like = SimpleNamespace(cu_seqlens_cpu=torch.tensor([0, 30, 64]), cu_seqlens=None, layout="contiguous",
                               pre_num_ranks=1, post_num_ranks=0)
    chain = chain_of(fla_like, 64, 1, 2)
    assert chain.local_cu_seqlens == (0, 30, 64) and chain.parts[0].pre == 1 and chain.parts[0].post == 0
    ours = chain_of(CPContext(cu_seqlens=torch.tensor([0, 94, 128])), 64, 1, 2)
    assert ours.local_cu_seqlens == (0, 30, 64) and ours.parts[0].pre == 1 and ours.parts[0].post == 0
    zig = chain_of(CPContext(layout="zigzag", cu_seqlens=torch.tensor([0, 128])), 64, 0, 2)
    assert [p.position for p in zig.parts] == [0, 3] and zig.local_cu_seqlens == (0, 32, 64)
    assert (zig.parts[0].pre, zig.parts[0].post, zig.parts[1].pre, zig.parts[1].post) == (0, 3, 3, 0)


def test_bad_context():
    xs, _ = stream([64])
    with pytest.raises(TypeError, match="`cp_context`: expected flashdelta.CPContext"):
        chunk_gated_delta_rule(*xs, cp_context="ranks")
    with pytest.raises(ValueError, match="`cp_context.layout`"):
        CPContext(layout="ring")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        chunk_gated_delta_rule(*xs, cp_context=CPContext())


def _bench_rank(rank, world, port, out):
    import runpy
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    bench = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "scripts", "cp_bench.py"))
    bench["main"](["--tokens-per-rank", "64", "--heads", "1/1", "--reps", "2", "--out", out])


def test_cp_bench_runs_on_gloo(tmp_path):
    """scripts/cp_bench.py end to end on two CPU ranks (a smoke test of the script, not a measurement)."""
    mp.start_processes(_bench_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    text = (tmp_path / "cp-2ranks.md").read_text()
    assert "| 128 (64) | 1/1 |" in text


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 4])
def test_fla_contexts_describe_the_same_chain(layout, world):
    """FLA's own FLACPContext (fla.ops.cp; fla needs triton, so this runs where fla is installed) and
    flashdelta's CPContext give every rank the same parts, local boundaries and neighbours."""
    cp = pytest.importorskip("fla.ops.cp.context")
    cu = torch.tensor([0, 100, 640, 700, 1024])
    for rank in range(world):
        fla_ctx = cp.get_cp_cu_seqlens(cu, cu_seqlens_cpu=cu, world_size=world, rank=rank, layout=layout)
        local = 1024 // world
        assert chain_of(fla_ctx, local, rank, world) == chain_of(CPContext(layout=layout, cu_seqlens=cu), local,
                                                                 rank, world), (layout, world, rank)


def test_refusals_under_cp_context():
    from flashdelta import fused_recurrent_gated_delta_rule
    xs, _ = stream([64])
    with pytest.raises(NotImplementedError, match="use chunk_gated_delta_rule"):
        fused_recurrent_gated_delta_rule(*xs[:4], beta=xs[4], cp_context=CPContext())
    with pytest.raises(ValueError, match="`initial_state`: not supported with `cp_context`"):
        chunk_gated_delta_rule(*xs, initial_state=torch.zeros(1, HV, D, D), cp_context=CPContext())
