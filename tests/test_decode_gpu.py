"""The decode kernel (``hopper/recurrent_step.py``) against the float64 token loop (needs an SM90 GPU).

Pools of every dtype and layout, slots in random order with -1 padding, several tokens per sequence,
speculative verify, the dense-state entry, and a CUDA graph replayed on new data. Slots the kernel
must write are poisoned with NaN first wherever it does not also read them."""
import pytest
import torch
import torch.nn.functional as F

from flashdelta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule
from helpers import make_inputs, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"
H, HV, D = 4, 8, 128


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")


def draw(seed, B, T, dtype=torch.bfloat16, l2norm=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, _ = make_inputs(B, T, H, HV, D, D, generator=gen, h0=False, zero_gate_heads=2)
    if not l2norm:
        q = F.normalize(q, dim=-1)
    else:
        q, k = 3 * q, 2 * k                        # the kernel normalises them
    return (q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), g.to(DEV, torch.float32),
            beta.to(DEV, torch.float32))


def reference(q, k, v, g, beta, h0, l2norm, cu=None):
    """o and every intermediate state (per token), float64, from the kernel's own (rounded) inputs."""
    q, k, v, g, beta = (x.double().cpu() for x in (q, k, v, g, beta))
    cu = None if cu is None else cu.cpu()
    o, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0.double().cpu(), use_qk_l2norm_in_kernel=l2norm,
                                  cu_seqlens=cu)
    return o


def pool_of(slots, dtype, v_first, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (slots, HV, D, D)
    return (torch.randn(*shape, generator=gen) * 0.3).to(DEV, dtype).contiguous()


def as_k_major(pool, v_first):
    return pool.transpose(-1, -2) if v_first else pool


@pytest.fixture(params=[32, 8], ids=lambda bv: f"BV{bv}")
def v_tile(request, monkeypatch):
    """Every decode test on each of the kernel's V tiles (``decode.V_TILES``)."""
    from flashdelta.gated_delta_rule import planner
    monkeypatch.setitem(planner.TUNING, "decode_v_tile", request.param)
    return request.param


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v_first", [True, False])
@pytest.mark.parametrize("tokens,l2norm", [(1, True), (3, False)])
def test_pool_decode(pool_dtype, v_first, tokens, l2norm, v_tile):
    _hopper()
    B, slots = 37, 64
    q, k, v, g, beta = draw(1, B, tokens, l2norm=l2norm)
    pool = pool_of(slots, pool_dtype, v_first, 2)
    rows = torch.randperm(slots, generator=torch.Generator().manual_seed(3))[:B].to(DEV)
    rows[::7] = -1                                                    # padding
    before = pool.clone()
    start = as_k_major(before, v_first).double().cpu()
    h0 = torch.stack([start[r] if r >= 0 else torch.zeros_like(start[0]) for r in rows.tolist()])
    want_o = reference(q, k, v, g, beta, h0, l2norm)
    _, want_s = naive_gated_delta_rule(*(x.double().cpu() for x in (q, k, v, g, beta)), initial_state=h0,
                                       output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=pool, state_indices=rows,
                                                use_qk_l2norm_in_kernel=l2norm, state_v_first=v_first,
                                                backend="tilelang")
    torch.cuda.synchronize()
    assert final is None
    errors = {"o": rel_err(o.cpu(), want_o)}
    got = as_k_major(pool, v_first).double().cpu()
    kept = [n for n, r in enumerate(rows.tolist()) if r >= 0]
    errors["state"] = rel_err(got[rows[kept].cpu()], want_s[kept])
    untouched = sorted(set(range(slots)) - set(rows.tolist()))
    assert torch.equal(pool[untouched], before[untouched]), "a slot no sequence names was written"
    state_tol = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}[pool_dtype]
    assert errors["o"] < 5e-3 and errors["state"] < state_tol, f"errors {errors}"


def test_speculative_verify_keeps_every_step(v_tile):
    _hopper()
    lens, steps, slots = [4, 1, 3, 4, 2], 4, 40
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k, v, g, beta = draw(5, 1, sum(lens))
    pool = pool_of(slots, torch.float32, True, 6)
    table = torch.arange(len(lens) * steps, device=DEV, dtype=torch.int32).view(len(lens), steps)
    table[1, 2] = -1
    accepted = torch.tensor([2, 1, 4, 1, 3], device=DEV, dtype=torch.int32)
    start = as_k_major(pool, True).double().cpu().clone()
    first = [table[n, accepted[n] - 1].item() for n in range(len(lens))]
    written = {table[n, t].item() for n in range(len(lens)) for t in range(lens[n])} - {-1} - set(first)
    pool[sorted(written)] = float("nan")                              # written, never read: poisoned
    fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=pool, state_indices=table,
                                     num_accepted_tokens=accepted, cu_seqlens=cu, state_v_first=True,
                                     backend="tilelang")
    torch.cuda.synchronize()
    got = as_k_major(pool, True).double().cpu()
    x = [t.double().cpu() for t in (q, k, v, g, beta)]
    offsets = cu.tolist()
    errors = {}
    for n, L in enumerate(lens):
        s = slice(offsets[n], offsets[n + 1])
        h0 = (start[first[n]] if first[n] >= 0 else torch.zeros_like(start[0]))[None]
        for t in range(L):
            _, st = naive_gated_delta_rule(*(y[:, s][:, :t + 1] for y in x), initial_state=h0, output_final_state=True)
            r = table[n, t].item()
            if r >= 0:
                errors[(n, t)] = rel_err(got[r], st[0])
    assert max(errors.values()) < 1e-5, f"errors {errors}"


@pytest.mark.parametrize("h0,final", [(True, True), (False, True), (True, False)])
def test_dense_state_decode(h0, final, v_tile):
    """fused_recurrent without a pool: the decode kernel on short sequences, a new final state."""
    _hopper()
    q, k, v, g, beta = draw(7, 16, 2)
    state = (torch.randn(16, HV, D, D, device=DEV) * 0.3) if h0 else None
    want = reference(q, k, v, g, beta, state if h0 else torch.zeros(16, HV, D, D), False)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=state, output_final_state=final)
    torch.cuda.synchronize()
    assert rel_err(o.cpu(), want) < 5e-3
    assert (ht is None) == (not final)
    if final:
        _, want_s = naive_gated_delta_rule(*(x.double().cpu() for x in (q, k, v, g, beta)),
                                           initial_state=None if state is None else state.double().cpu(),
                                           output_final_state=True)
        assert rel_err(ht.cpu(), want_s) < 1e-5


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_raw_gates_activated_in_the_kernel(neg_eigval, v_tile):
    """Qwen3-Next's raw projections (A_log, dt_bias, sigmoid beta) on the kernel, against the PyTorch path."""
    _hopper()
    B, slots = 24, 32
    q, k, v, a, b = draw(12, B, 2, l2norm=True)
    gen = torch.Generator().manual_seed(13)
    a, b = (torch.randn(B, 2, HV, generator=gen) * 2).to(DEV), (torch.randn(B, 2, HV, generator=gen) * 2).to(DEV)
    A_log, dt_bias = torch.randn(HV, generator=gen).to(DEV), torch.randn(HV, generator=gen).to(DEV)
    pool = pool_of(slots, torch.float32, True, 14)
    rows = torch.randperm(slots, device=DEV)[:B]
    outs = {}
    for backend in ("tilelang", "torch"):
        p = pool.clone()
        o, _ = fused_recurrent_gated_delta_rule(q, k, v, a, beta=b, initial_state=p, state_indices=rows,
                                                use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                                                dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                                                allow_neg_eigval=neg_eigval, state_v_first=True, backend=backend)
        outs[backend] = (o.float(), p)
    torch.cuda.synchronize()
    errors = {"o": rel_err(outs["tilelang"][0], outs["torch"][0]), "state": rel_err(outs["tilelang"][1], outs["torch"][1])}
    assert errors["o"] < 1e-2 and errors["state"] < 1e-5, f"errors {errors}"


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_prefill_on_a_pool_equals_dense_states(pool_dtype):
    """chunk_gated_delta_rule with state_indices on the kernels: the same as the dense-state call."""
    _hopper()
    lens = [300, 64, 1, 700]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k, v, g, beta = draw(15, 1, sum(lens))
    pool = pool_of(12, pool_dtype, True, 16)
    rows = torch.tensor([7, -1, 2, 9], device=DEV)
    h0 = as_k_major(pool, True)[rows.clamp(min=0)].float() * (rows >= 0)[:, None, None, None]
    want_o, want_s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                            cu_seqlens=cu)
    before = pool.clone()
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, state_indices=rows, cu_seqlens=cu,
                                  state_v_first=True)
    torch.cuda.synchronize()
    got = as_k_major(pool, True)
    assert torch.equal(o, want_o)
    assert torch.equal(got[[7, 2, 9]], want_s[[0, 2, 3]].to(pool_dtype))
    untouched = [s for s in range(12) if s not in (7, 2, 9)]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("v_first", [False, True])
def test_checkpoints_on_the_kernels(v_first):
    """checkpoint_every with a buffer of q's dtype on the kernels: the state after every 128 tokens
    against the float64 token loop, within bf16's rounding (and the pool prefill with them)."""
    _hopper()
    from flashdelta import checkpoint_offsets, explain
    lens = [300, 128, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k, v, g, beta = draw(17, 1, sum(lens))
    offsets = checkpoint_offsets(lens, 128)
    shape = (offsets[-1], HV, D, D)
    buf = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    kw = dict(cu_seqlens=cu, state_v_first=v_first, checkpoint_every=128)
    assert explain(q, k, v, g, beta, checkpoints=buf, **kw).startswith("tilelang")
    chunk_gated_delta_rule(q, k, v, g, beta, checkpoints=buf, **kw)
    torch.cuda.synchronize()
    got = (buf.transpose(-1, -2) if v_first else buf).double().cpu()
    x = [t.double().cpu() for t in (q, k, v, g, beta)]
    errors = {}
    for n, L in enumerate(lens):
        a = cu[n].item()
        for j in range(L // 128):
            s = slice(a, a + (j + 1) * 128)
            _, want = naive_gated_delta_rule(*(y[:, s] for y in x), output_final_state=True)
            errors[(n, j)] = rel_err(got[offsets[n] + j], want[0])
    assert max(errors.values()) < 5e-3, f"errors {errors}"


def test_graph_replay_equals_eager(v_tile):
    """A decode step captured once, replayed on new q/k/v/g/beta, slots and pool contents."""
    _hopper()
    B, slots = 64, 128
    static = list(draw(8, B, 1))
    rows = torch.randperm(slots, device=DEV)[:B].to(torch.int32)
    pool = pool_of(slots, torch.bfloat16, True, 9)

    def step():
        return fused_recurrent_gated_delta_rule(*static[:4], beta=static[4], initial_state=pool, state_indices=rows,
                                                state_v_first=True, use_qk_l2norm_in_kernel=True)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = step()
    for x, fresh in zip(static, draw(10, B, 1)):
        x.copy_(fresh)
    rows.copy_(torch.randperm(slots, device=DEV)[:B])
    fresh_pool = pool_of(slots, torch.bfloat16, True, 11)
    pool.copy_(fresh_pool)
    graph.replay()
    replayed = pool.clone()
    pool.copy_(fresh_pool)
    o = step()
    torch.cuda.synchronize()
    assert torch.equal(o_graph, o) and torch.equal(replayed, pool)
