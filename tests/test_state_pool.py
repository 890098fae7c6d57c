"""State pools (``state_indices``): prefill and decode read and write slots in place, on the PyTorch path.

References are the float64 token loop run on the states gathered by hand; the pool's other slots must
stay bit for bit as they were."""
import pytest
import torch

import flashdelta
from flashdelta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from flashdelta.gated_delta_rule.gates import activate
from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule
from flashdelta.gated_delta_rule.state_pool import write_states
from helpers import make_inputs, rel_err

H, HV, K, V = 2, 4, 8, 6


def draw(lens, seed=0, slots=7, dtype=torch.float64, pool_dtype=torch.float64, v_first=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, _ = make_inputs(1, sum(lens), H, HV, K, V, generator=gen, h0=False, dtype=dtype)
    shape = (slots, HV, V, K) if v_first else (slots, HV, K, V)
    pool = torch.randn(*shape, generator=gen, dtype=torch.float64).to(pool_dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return q, k, v, g, beta, pool, cu


def reference(q, k, v, g, beta, pool, cu, rows, v_first=False, **kw):
    """o and final states of the token loop from the slots ``rows`` (-1: zeros), K-major, float64."""
    states = pool.double()
    states = states.transpose(-1, -2) if v_first else states
    h0 = torch.stack([states[r] if r >= 0 else torch.zeros_like(states[0]) for r in rows])
    return naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, **kw)


def stored(pool, v_first):
    return pool.transpose(-1, -2) if v_first else pool


@pytest.mark.parametrize("op", ["chunk", "recurrent"])
@pytest.mark.parametrize("v_first", [False, True])
def test_slots_in_random_order_with_padding(op, v_first):
    lens = [70, 0, 5, 130, 1]
    q, k, v, g, beta, pool, cu = draw(lens, v_first=v_first)
    rows = [5, 0, -1, 2, 6]
    want_o, want_s = reference(q, k, v, g, beta, pool, cu, rows, v_first)
    out = pool.clone()
    call = chunk_gated_delta_rule if op == "chunk" else fused_recurrent_gated_delta_rule
    o, final = call(q, k, v, g, beta=beta, initial_state=out, state_indices=torch.tensor(rows), cu_seqlens=cu,
                    state_v_first=v_first)
    assert final is None and rel_err(o, want_o) < 1e-12
    for n, r in enumerate(rows):
        if r >= 0:
            assert rel_err(stored(out, v_first)[r], want_s[n]) < 1e-12
    untouched = [s for s in range(pool.shape[0]) if s not in rows]
    assert torch.equal(out[untouched], pool[untouched])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_dtypes_round_once(pool_dtype):
    lens = [100, 37]
    q, k, v, g, beta, pool, cu = draw(lens, dtype=torch.float32, pool_dtype=pool_dtype)
    rows = [3, 1]
    _, want_s = reference(q, k, v, g, beta, pool, cu, rows)
    out = pool.clone()
    chunk_gated_delta_rule(q, k, v, g, beta, initial_state=out, state_indices=torch.tensor(rows, dtype=torch.int32),
                           cu_seqlens=cu)
    # float32 compute, then one rounding to the pool's dtype: its half ulp (relative) beside float32's error
    ulp = {torch.float32: 0.0, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[pool_dtype]
    assert out.dtype == pool_dtype
    for n, r in enumerate(rows):
        assert rel_err(out[r], want_s[n]) < ulp / 2 + 1e-5


def test_strided_pool_rows():
    lens = [64, 20]
    q, k, v, g, beta, pool, cu = draw(lens)
    cache = torch.randn(pool.shape[0], 3, *pool.shape[1:], dtype=pool.dtype)   # another layer's state between rows
    cache[:, 1] = pool
    view = cache[:, 1]
    assert not view.is_contiguous()
    before = cache.clone()
    rows = [4, 0]
    want_o, want_s = reference(q, k, v, g, beta, pool, cu, rows)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=view, state_indices=torch.tensor(rows), cu_seqlens=cu)
    assert rel_err(o, want_o) < 1e-12 and rel_err(cache[4, 1], want_s[0]) < 1e-12
    assert torch.equal(cache[:, [0, 2]], before[:, [0, 2]])


def test_repeated_calls_continue_from_the_pool():
    """Chunked prefill in pieces, then decode steps, all on the pool: equal to one long call."""
    lens = [150, 90]
    q, k, v, g, beta, pool, cu = draw(lens)
    rows = torch.tensor([2, 5])
    want_o, want_s = reference(q, k, v, g, beta, pool, cu, rows.tolist())
    out = pool.clone()
    starts = cu[:-1].tolist()
    pieces = [(0, 64), (64, 80), (80, 89)] + [(t, t + 1) for t in range(89, 150)]   # the last ones: decode steps
    outputs = {n: [] for n in range(2)}
    for a, b in pieces:
        live = [n for n in range(2) if a < lens[n]]
        idx = [torch.arange(starts[n] + a, starts[n] + min(b, lens[n])) for n in live]
        cu_p = torch.tensor([0, *torch.tensor([len(i) for i in idx]).cumsum(0).tolist()])
        tok = torch.cat(idx)
        call = chunk_gated_delta_rule if b - a > 1 else fused_recurrent_gated_delta_rule
        o, _ = call(q[:, tok], k[:, tok], v[:, tok], g[:, tok], beta=beta[:, tok], initial_state=out,
                    state_indices=rows[live], cu_seqlens=cu_p)
        for n, part in zip(live, o[0].split([len(i) for i in idx])):
            outputs[n].append(part)
    o = torch.cat([torch.cat(outputs[n]) for n in range(2)])[None]
    assert rel_err(o, want_o) < 1e-12
    assert rel_err(out[2], want_s[0]) < 1e-12 and rel_err(out[5], want_s[1]) < 1e-12


def test_dense_batch_decode_with_gating_and_l2norm():
    """B sequences of T tokens each (no cu_seqlens), Qwen3-Next's raw gates and q/k normalisation fused."""
    gen = torch.Generator().manual_seed(3)
    B, T = 3, 2
    q, k, v, _, _, _ = make_inputs(B, T, H, HV, K, V, generator=gen, h0=False)
    a, b = torch.randn(B, T, HV, generator=gen, dtype=torch.float64), torch.randn(B, T, HV, generator=gen,
                                                                                  dtype=torch.float64)
    A_log, dt_bias = torch.randn(HV, generator=gen, dtype=torch.float64), torch.randn(HV, generator=gen,
                                                                                      dtype=torch.float64)
    pool = torch.randn(5, HV, K, V, generator=gen, dtype=torch.float64)
    rows = [4, 1, 3]
    g, beta = activate(a, b, True, A_log, dt_bias, True, False)
    want_o, want_s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=pool[rows], output_final_state=True,
                                            use_qk_l2norm_in_kernel=True)
    out = pool.clone()
    o, _ = fused_recurrent_gated_delta_rule(q, k, v, a, beta=b, initial_state=out, state_indices=torch.tensor(rows),
                                            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                                            dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
    assert rel_err(o, want_o) < 1e-12 and rel_err(out[rows], want_s) < 1e-12


def test_speculative_verify():
    """Per-step slots: the state after each draft token is kept; the next step starts from the slot of
    the last accepted token."""
    lens = [4, 2, 3]
    q, k, v, g, beta, pool, cu = draw(lens, slots=16)
    steps = torch.tensor([[0, 1, 2, 3], [4, 5, -1, -1], [6, -1, 8, 9]])     # -1: that step's state is not kept
    accepted = torch.tensor([3, 1, 4])                                      # start from columns 2, 0, 3
    out = pool.clone()
    o, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=out, state_indices=steps,
                                            num_accepted_tokens=accepted, cu_seqlens=cu)
    starts = cu.tolist()
    for n in range(3):
        r = steps[n, accepted[n] - 1].item()
        s = slice(starts[n], starts[n + 1])
        h0 = (pool[r] if r >= 0 else torch.zeros_like(pool[0]))[None]
        want = []
        for t in range(lens[n]):
            _, st = naive_gated_delta_rule(q[:, s][:, :t + 1], k[:, s][:, :t + 1], v[:, s][:, :t + 1],
                                           g[:, s][:, :t + 1], beta[:, s][:, :t + 1], initial_state=h0,
                                           output_final_state=True)
            want.append(st[0])
            if steps[n, t] >= 0:
                assert rel_err(out[steps[n, t]], st[0]) < 1e-12
        o_n, _ = naive_gated_delta_rule(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], initial_state=h0)
        assert rel_err(o[:, s], o_n) < 1e-12
    untouched = [x for x in range(16) if x not in steps.flatten().tolist()]
    assert torch.equal(out[untouched], pool[untouched])


def test_decode_equals_prefill_then_one_long_call():
    """A dense batch: prefill 30 tokens on the pool, then 10 decode steps, against one 40-token call."""
    lens = [40, 40]
    q, k, v, g, beta, pool, cu = draw(lens)
    rows = torch.tensor([1, 3])
    want_o, want_s = reference(q, k, v, g, beta, pool, cu, rows.tolist())
    out = pool.clone()
    dense = [x.view(2, 40, *x.shape[2:]) for x in (q, k, v, g, beta)]
    chunk_gated_delta_rule(*(x[:, :30] for x in dense), initial_state=out, state_indices=rows)
    parts = []
    for t in range(30, 40):
        q_t, k_t, v_t, g_t, beta_t = (x[:, t:t + 1] for x in dense)
        parts.append(fused_recurrent_gated_delta_rule(q_t, k_t, v_t, g_t, beta=beta_t, initial_state=out,
                                                      state_indices=rows)[0])
    assert rel_err(torch.cat(parts, 1), want_o.view(2, 40, HV, V)[:, 30:]) < 1e-12
    assert rel_err(out[rows], want_s) < 1e-12


def test_slots_rechecked_after_an_in_place_change():
    q, k, v, g, beta, pool, cu = draw([10, 5])
    idx = torch.tensor([0, 1])
    chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, state_indices=idx, cu_seqlens=cu)
    idx[1] = 0
    with pytest.raises(ValueError, match="slot 0 is written more than once"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, state_indices=idx, cu_seqlens=cu)


def test_write_states_skips_padding_without_a_host_read():
    pool = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).view(4, 2, 3, 3)
    states = -torch.rand(3, 2, 3, 3)
    before = pool.clone()
    write_states(pool, torch.tensor([-1, 2, -1]), states, False)
    assert torch.equal(pool[2], states[1]) and torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]])
    write_states(pool, torch.tensor([-1, -1, -1]), states, False)
    assert torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]]) and torch.equal(pool[2], states[1])


def test_inference_mode_and_compile():
    lens = [70, 9]
    q, k, v, g, beta, pool, cu = draw(lens, dtype=torch.float32, pool_dtype=torch.float32)
    rows = [2, 0]
    eager = pool.clone()
    want, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=eager, state_indices=torch.tensor(rows),
                                     cu_seqlens=cu)
    with torch.inference_mode():
        inf = pool.clone()
        idx = torch.tensor(rows)
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=inf, state_indices=idx, cu_seqlens=cu)
        assert torch.equal(o, want) and torch.equal(inf, eager)
        idx[1] = 2                      # in place: an inference tensor has no version to tell
        with pytest.raises(ValueError, match="slot 2 is written more than once"):
            chunk_gated_delta_rule(q, k, v, g, beta, initial_state=inf, state_indices=idx, cu_seqlens=cu)

    torch._dynamo.reset()

    def step(q, k, v, g, beta, pool, idx, cu):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, state_indices=idx, cu_seqlens=cu)
        o2, _ = fused_recurrent_gated_delta_rule(q[:, :2], k[:, :2], v[:, :2], g[:, :2], beta=beta[:, :2],
                                                 initial_state=pool, state_indices=idx,
                                                 cu_seqlens=torch.tensor([0, 1, 2]))
        return o, o2
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = pool.clone(), pool.clone()
    want = step(q, k, v, g, beta, a, torch.tensor(rows), cu)
    got = compiled(q, k, v, g, beta, b, torch.tensor(rows), cu)
    assert all(torch.equal(x, y) for x, y in zip(got, want)) and torch.equal(a, b)


@pytest.mark.parametrize("kw,error,match", [
    ({"state_indices": torch.tensor([1, 1])}, ValueError, "slot 1 is written more than once"),
    ({"state_indices": torch.tensor([0, 7])}, ValueError, "slot 7 is outside the pool's 7 slots"),
    ({"state_indices": torch.tensor([0, -2])}, ValueError, "slot -2 is outside"),
    ({"state_indices": torch.tensor([0, 1, 2])}, ValueError, r"`state_indices`: expected shape \[N=2\]"),
    ({"state_indices": torch.tensor([[0], [1]])}, ValueError, r"`state_indices`: expected shape \[N=2\]"),
    ({"state_indices": torch.tensor([0.0, 1.0])}, TypeError, "`state_indices`: expected int32 or int64"),
    ({"state_indices": [0, 1]}, TypeError, "`state_indices`: expected a torch.Tensor"),
    ({"initial_state": torch.zeros(7, HV, V, K)}, ValueError, r"expected a state pool \[slots, HV, K, V\]"),
    ({"initial_state": torch.zeros(7, HV, K, V, dtype=torch.int32)}, TypeError, "expected a pool of float32"),
    ({"initial_state": torch.zeros(7, HV, K, V, device="meta")}, ValueError, "expected device cpu"),
    ({"initial_state": torch.zeros(7, HV, V, K).transpose(-1, -2)}, ValueError, "each row of the state pool"),
    ({"initial_state": torch.zeros(7, HV, K, V, requires_grad=True)}, ValueError, "cannot require grad"),
])
def test_bad_pool_arguments(kw, error, match):
    q, k, v, g, beta, pool, cu = draw([10, 5], dtype=torch.float32, pool_dtype=torch.float32)
    args = dict(initial_state=pool, state_indices=torch.tensor([0, 1]), cu_seqlens=cu)
    args.update(kw)
    with pytest.raises(error, match=match):
        chunk_gated_delta_rule(q, k, v, g, beta, **args)


@pytest.mark.parametrize("kw,error,match", [
    ({"num_accepted_tokens": torch.tensor([1, 1])}, ValueError, r"needs per-step `state_indices`"),
    ({"state_indices": torch.tensor([[0, 1], [2, 3]]), "num_accepted_tokens": torch.tensor([1, 3])}, ValueError,
     r"`num_accepted_tokens`: expected values in \[1, 2\]"),
    ({"state_indices": torch.tensor([[0, 1], [2, 3]]), "num_accepted_tokens": torch.tensor([1])}, ValueError,
     r"`num_accepted_tokens`: expected shape \[N=2\]"),
    ({"state_indices": torch.tensor([[0, 1], [2, 1]])}, ValueError, "slot 1 is written more than once"),
    ({"state_indices": torch.tensor([[0], [2]])}, ValueError, "expected one slot per token, at least 2 columns"),
    ({"state_indices": torch.tensor([0, 1]), "ssm_state_indices": torch.tensor([0, 1])}, ValueError, "not both"),
])
def test_bad_decode_arguments(kw, error, match):
    q, k, v, g, beta, pool, cu = draw([2, 2], dtype=torch.float32, pool_dtype=torch.float32)
    args = dict(initial_state=pool, cu_seqlens=cu)
    args.update(kw)
    with pytest.raises(error, match=match):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, **args)


def test_vllm_name_of_the_indices():
    q, k, v, g, beta, pool, cu = draw([1, 1])
    a, b = pool.clone(), pool.clone()
    x = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=a, ssm_state_indices=torch.tensor([3, 4]),
                                         cu_seqlens=cu, inplace_final_state=True)[0]
    y = fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=b, state_indices=torch.tensor([3, 4]),
                                         cu_seqlens=cu)[0]
    assert torch.equal(x, y) and torch.equal(a, b) and not torch.equal(a, pool)
    assert flashdelta.fused_recurrent_gated_delta_rule is fused_recurrent_gated_delta_rule


def test_kernel_route_refusals_on_the_cpu():
    """backend='tilelang' names why the decode kernel cannot run; pools the kernel cannot index are named."""
    q, k, v, g, beta, pool, cu = draw([1, 1], dtype=torch.float32, pool_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="backend='tilelang' cannot run this call: tensors are on cpu"):
        fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, initial_state=pool, state_indices=torch.tensor([0, 1]),
                                         cu_seqlens=cu, backend="tilelang")
    pytest.importorskip("tilelang")
    from flashdelta.gated_delta_rule.hopper.decode import pool_unsupported
    assert pool_unsupported(torch.zeros(4, 2, 8, 8)) is None
    odd = torch.zeros(4 * 2 * 64 + 1)[1:].view(4, 2, 8, 8)                  # 4 bytes off a 16-byte boundary
    assert "16-byte aligned" in pool_unsupported(odd)
    assert "float32/bfloat16/float16" in pool_unsupported(torch.zeros(4, 2, 8, 8, dtype=torch.float64))


def test_explain_names_the_pool_and_checkpoint_route():
    q, k, v, g, beta, pool, cu = draw([70, 9], dtype=torch.float32, pool_dtype=torch.float32)
    text = flashdelta.explain(q, k, v, g, beta, initial_state=pool, state_indices=torch.tensor([0, 1]), cu_seqlens=cu)
    assert text.startswith("torch (tensors are on cpu") and text.endswith("written after the call")
    buf = torch.empty(1, HV, K, V)
    assert flashdelta.explain(q, k, v, g, beta, cu_seqlens=cu, checkpoint_every=64, checkpoints=buf).startswith("torch")
