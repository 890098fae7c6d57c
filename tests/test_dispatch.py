"""The kernel branch of the dispatch, on the CPU: the Hopper entry points are replaced by the PyTorch
path, so what is checked is that every argument reaches them and their results come back."""
import pytest
import torch

import flashdelta
from flashdelta.gated_delta_rule import api
from flashdelta.gated_delta_rule.chunked import chunked_gated_delta_rule
from flashdelta.gated_delta_rule.chunked_backward import chunked_backward
from flashdelta.gated_delta_rule.inputs import Problem
from helpers import make_inputs, rel_err

pytest.importorskip("tilelang")
from flashdelta.gated_delta_rule.hopper import context_parallel as hopper_cp  # noqa: E402
from flashdelta.gated_delta_rule.hopper import context_parallel_backward as hopper_cp_bwd  # noqa: E402
from flashdelta.gated_delta_rule.hopper import backward as hopper_bwd  # noqa: E402
from flashdelta.gated_delta_rule.hopper import forward as hopper_fwd  # noqa: E402


def as_torch(q, k, v, g, beta, scale, h0, final, l2, cu, seq_lens, v_first, **segments):
    problem = Problem(q.shape[0], q.shape[1], q.shape[2], v.shape[2], q.shape[3], v.shape[3], tuple(seq_lens))
    return chunked_gated_delta_rule(q, k, v, g, beta, scale, h0, final, l2, problem, cu is None, v_first, **segments)


@pytest.fixture
def kernels(monkeypatch):
    calls = []

    def fake_forward(*a, v_tile=128, checkpoints=None, save_states=False):
        calls.append(("unsplit", v_tile) + (("checkpoints",) if checkpoints is not None else ()))
        out = as_torch(*a, checkpoints=checkpoints)
        return out + (None,) if save_states else out          # no stored states: the backward recomputes

    def fake_cp(*a, save_states=False):
        *a, plan = a
        calls.append(("cp", plan.segment_chunks))
        out = as_torch(*a, segment_chunks=plan.segment_chunks)
        return out + (None,) if save_states else out

    monkeypatch.setattr(api, "_tilelang_unavailable", lambda *a: None)
    monkeypatch.setattr(api, "sm_count", lambda device: 132)
    monkeypatch.setattr(hopper_fwd, "hopper_forward",
                        lambda *a, **kw: fake_forward(*a[:-1], v_tile=a[-1], **kw))
    def fake_backward(q, k, v, g, beta, scale, h0, l2, cu, seq_lens, v_first, do, dht, needs_dh0=True, walk_tile=None,
                      state_tile=None, states=None):
        calls.append(("backward", state_tile, walk_tile))
        problem = Problem(q.shape[0], q.shape[1], q.shape[2], v.shape[2], q.shape[3], v.shape[3], tuple(seq_lens))
        return chunked_backward(q, k, v, g, beta, scale, h0, l2, problem, cu is None, v_first, do, dht)

    def fake_cp_backward(q, k, v, g, beta, scale, h0, l2, cu, seq_lens, v_first, do, dht, plan, needs_dh0=True,
                         walk_tile=None, states=None):
        calls.append(("cp backward", plan.segment_chunks, walk_tile))
        problem = Problem(q.shape[0], q.shape[1], q.shape[2], v.shape[2], q.shape[3], v.shape[3], tuple(seq_lens))
        return chunked_backward(q, k, v, g, beta, scale, h0, l2, problem, cu is None, v_first, do, dht)

    monkeypatch.setattr(hopper_cp, "hopper_cp_forward", fake_cp)
    monkeypatch.setattr(hopper_bwd, "hopper_backward", fake_backward)
    monkeypatch.setattr(hopper_cp_bwd, "hopper_cp_backward", fake_cp_backward)
    return calls


@pytest.mark.parametrize("context_parallel", [None, 3])
@pytest.mark.parametrize("varlen", [False, True])
def test_kernel_branch_threads_every_argument(kernels, context_parallel, varlen):
    gen = torch.Generator().manual_seed(0)
    B, T = (1, 700) if varlen else (2, 350)
    q, k, v, g, beta, h0 = make_inputs(B, T, 1, 2, 8, 8, generator=gen, num_seqs=2)
    h0 = h0.transpose(-1, -2).contiguous()
    kw = dict(scale=0.3, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
              state_v_first=True, cu_seqlens=torch.tensor([0, 300, 700]) if varlen else None)
    with torch.no_grad():
        assert flashdelta.explain(q, k, v, g, beta, initial_state=h0, cu_seqlens=kw["cu_seqlens"],
                                  context_parallel=context_parallel).startswith("tilelang")
        o, s = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, context_parallel=context_parallel, **kw)
    o_ref, s_ref = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, backend="torch", **kw)
    assert [c[0] for c in kernels] == ["cp" if context_parallel else "unsplit"]
    assert context_parallel is None or kernels[0][1] == context_parallel
    assert rel_err(o, o_ref) <= 1e-10 and rel_err(s, s_ref) <= 1e-10


@pytest.mark.parametrize("varlen, l2, v_first, final, frozen_qk", [
    (False, False, False, True, False), (True, True, True, True, False), (True, False, False, False, True)])
def test_gradients_take_the_kernel_backward(kernels, varlen, l2, v_first, final, frozen_qk):
    """Autograd on the kernel branch: the forward's inputs reach the backward, its gradients come back
    for exactly the inputs that need them (the backward's stand-in is the staged PyTorch backward)."""
    gen = torch.Generator().manual_seed(1)
    B, T = (1, 300) if varlen else (2, 150)
    xs = make_inputs(B, T, 1, 2, 8, 8, generator=gen, num_seqs=2)
    if v_first:
        xs[5] = xs[5].transpose(-1, -2).contiguous()
    kw = dict(scale=0.3, output_final_state=final, use_qk_l2norm_in_kernel=l2, state_v_first=v_first,
              cu_seqlens=torch.tensor([0, 100, 300]) if varlen else None)

    def grads(backend):
        leaves = [x.clone().requires_grad_(not (frozen_qk and i < 2)) for i, x in enumerate(xs)]
        o, s = flashdelta.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], backend=backend, **kw)
        loss = (o * o).sum() + (s.sum() if final else 0)
        loss.backward()
        return [x.grad for x in leaves]

    expected = grads("torch")
    assert not kernels
    got = grads("auto")
    assert [c[0] for c in kernels] == ["unsplit", "backward"]
    for a, e in zip(got, expected):
        assert (a is None) == (e is None)
        assert a is None or rel_err(a, e) <= 1e-10


@pytest.mark.parametrize("context_parallel,auto,expected", [
    (3, False, [("cp", 3), ("cp backward", 3, 64)]),      # asked for: the backward follows the segments
    (None, False, [("cp", 2), ("backward", 128, 64)]),    # planned, backward split not on: unsplit backward
    (None, True, [("cp", 2), ("cp backward", 2, 64)]),    # planned, on in the tuning table, and it pays
])
def test_backward_follows_the_forward_segments(kernels, monkeypatch, context_parallel, auto, expected):
    from flashdelta.gated_delta_rule import planner
    monkeypatch.setitem(planner.TUNING, "auto_backward_context_parallel", auto)
    monkeypatch.setattr(planner, "backward_estimates", lambda *a: (1.0, 0.0))    # the split modelled faster
    monkeypatch.setattr(api, "plan_forward", lambda *a: planner.plan_forward(*a[:-1], context_parallel or 2))
    gen = torch.Generator().manual_seed(3)
    xs = make_inputs(1, 700, 1, 2, 8, 8, generator=gen)

    def grads(backend):
        leaves = [x.clone().requires_grad_() for x in xs]
        o, s = flashdelta.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                                 backend=backend, context_parallel=context_parallel)
        ((o * o).sum() + s.sum()).backward()
        return [x.grad for x in leaves]

    want = grads("torch")
    kernels.clear()
    path = flashdelta.explain(*[x.clone().requires_grad_() for x in xs[:5]], initial_state=xs[5],
                              context_parallel=context_parallel)
    assert path.endswith("; TileLang backward" + (", context parallel" if expected[1][0] == "cp backward" else ""))
    got = grads("auto")
    assert kernels == expected
    assert all(rel_err(a, e) <= 1e-10 for a, e in zip(got, want))


def test_activated_gates_reach_the_kernels(kernels):
    """use_gate_in_kernel / use_beta_sigmoid_in_kernel on the kernel branch: the kernels get the activated
    g and beta, and autograd carries the backward on to A_log, dt_bias and the raw inputs."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, g, beta, h0 = make_inputs(1, 130, 1, 2, 8, 8, generator=gen)
    A_log, dt_bias = torch.randn(2, generator=gen, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    raw = [q, k, v, torch.randn(g.shape, generator=gen, dtype=torch.float64), 2 * beta - 1, h0, A_log, dt_bias]

    def grads(backend):
        leaves = [x.clone().requires_grad_() for x in raw]
        o, s = flashdelta.chunk_gated_delta_rule(
            *leaves[:5], initial_state=leaves[5], output_final_state=True, use_gate_in_kernel=True, A_log=leaves[6],
            dt_bias=leaves[7], use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, use_qk_l2norm_in_kernel=True,
            backend=backend)
        ((o * o).sum() + s.sum()).backward()
        return [x.grad for x in leaves]

    expected = grads("torch")
    got = grads("auto")
    assert [c[0] for c in kernels] == ["unsplit", "backward"]
    assert all(rel_err(a, e) <= 1e-10 for a, e in zip(got, expected))


def test_backward_tables_from_the_plan():
    """The CP backward's tables: every real segment used, each sequence's segments reversed (padded
    with the "none" row), each sequence's first segment (-1 for an empty one)."""
    from flashdelta.gated_delta_rule import planner
    lens = (300, 0, 130)
    plan = planner.plan_forward(lens, 2, 128, 132, 2)
    table, reverse, first = hopper_cp_bwd.backward_tables(plan, lens, None, torch.device("cpu"))
    S = len(plan.segments)
    per_seq = [[i for i, (n, _, _) in enumerate(plan.segments) if n == s] for s in range(3)]
    assert table.segments[:-1, 4].tolist() == [1] * S and table.segments[-1].tolist() == [0, 0, 0, 0, 0]
    width = reverse.shape[1]
    assert reverse.tolist() == [p[::-1] + [S] * (width - len(p)) for p in per_seq]
    assert first.tolist() == [per_seq[0][0], -1, per_seq[2][0]]
    assert planner.backward_plan(plan, 2, 2, 128, 132) is plan
    assert planner.backward_plan(plan, None, 2, 128, 132) is None
    assert planner.backward_plan(planner.plan_forward(lens, 2, 128, 132, False), True, 2, 128, 132) is None


@pytest.mark.parametrize("buffer_dtype,kernels_take_it", [(torch.float64, True), (torch.float32, False)])
def test_checkpoints_on_the_kernel_branch(kernels, buffer_dtype, kernels_take_it):
    """A checkpoint buffer of q's dtype goes to the kernels with the call; another dtype keeps the
    PyTorch path (the kernels store the states in q's dtype)."""
    from flashdelta import checkpoint_offsets
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta, h0 = make_inputs(1, 330, 1, 2, 8, 8, generator=gen, num_seqs=2)
    cu = torch.tensor([0, 200, 330])
    rows = checkpoint_offsets([200, 130], 64)[-1]
    buf, want = torch.zeros(rows, 2, 8, 8, dtype=buffer_dtype), torch.zeros(rows, 2, 8, 8, dtype=buffer_dtype)
    with torch.no_grad():
        o, _ = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                 checkpoint_every=64, checkpoints=buf)
        o_ref, _ = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                                                     checkpoint_every=64, checkpoints=want, backend="torch")
    assert [(c[0], c[-1]) for c in kernels] == ([("unsplit", "checkpoints")] if kernels_take_it else [])
    assert torch.equal(buf, want) and torch.equal(o, o_ref)


@pytest.mark.parametrize("stores", [False, True])
def test_stored_states_reach_the_backward(kernels, monkeypatch, stores):
    """With ``TUNING["forward_stores_states"]`` the forward is asked for its per-chunk states and the
    backward gets exactly those; without, the backward gets none (and recomputes them)."""
    from flashdelta.gated_delta_rule import planner
    monkeypatch.setitem(planner.TUNING, "forward_stores_states", stores)
    marker = torch.zeros(1)
    forward, backward, seen = hopper_fwd.hopper_forward, hopper_bwd.hopper_backward, []

    def storing_forward(*a, save_states=False, **kw):
        out = forward(*a, **kw)
        return out + (marker,) if save_states else out

    def recording_backward(*a, states=None, **kw):
        seen.append(states)
        return backward(*a, **kw)

    monkeypatch.setattr(hopper_fwd, "hopper_forward", storing_forward)
    monkeypatch.setattr(hopper_bwd, "hopper_backward", recording_backward)
    gen = torch.Generator().manual_seed(4)
    leaves = [x.requires_grad_() for x in make_inputs(1, 200, 1, 2, 8, 8, generator=gen)]
    o, s = flashdelta.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                             context_parallel=False)
    ((o * o).sum() + s.sum()).backward()
    assert len(seen) == 1 and (seen[0] is marker if stores else seen[0] is None)


def test_state_tables_name_each_first_chunk():
    """The tables of the recurrence that stores its per-chunk states: the sequences' (first token,
    length, final-state row, first chunk) and the CP output pass's segment rows with their first chunk."""
    from flashdelta.gated_delta_rule import planner
    from flashdelta.gated_delta_rule.hopper import context_parallel as hcp
    cpu = torch.device("cpu")
    lens = (100, 0, 200)
    assert hopper_fwd._state_rows(lens, None, cpu).tolist() == [[0, 100, 0, 0], [100, 0, 1, 2], [100, 200, 2, 2]]
    assert hopper_fwd._state_rows((130, 130), 256, cpu)[:, 3].tolist() == [0, 3]           # batched: padded rows
    assert hopper_bwd._walk_table(lens, None, cpu).tolist() == [[0, 100, 0], [100, 0, 2], [100, 200, 2]]
    plan = planner.plan_forward(lens, 2, 128, 132, 2)
    spans = hcp._state_spans(plan, lens, None, cpu)
    table = hcp.SegmentTable.build(plan, lens, None, cpu)
    assert torch.equal(spans[:, :3], table.spans) and torch.equal(spans[:, 3], table.segments[:, 2])
