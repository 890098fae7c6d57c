"""Hopper backward against autograd of the float64 reference (needs a CUDA Hopper GPU; skipped elsewhere).

Each kernel is first checked against its stage of ``chunked_backward`` on the same inputs (so a failure
names the kernel), then the whole backward through ``chunk_gated_delta_rule``'s autograd against
autograd of the float64 path, with FLA's tolerances (DESIGN section 1)."""
import pytest
import torch

import flashdelta
from flashdelta.gated_delta_rule import chunked_backward as spec
from flashdelta.gated_delta_rule.chunked import ChunkLayout

from helpers import make_inputs, rel_err

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {"o": 5e-3, "ht": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dh0": 8e-3, "dbeta": 2e-2, "dg": 2e-2}
NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")


def _poison(numel):
    """Fill the caching allocator's next blocks with NaN so unwritten outputs show up."""
    held = [torch.full((numel,), float("nan"), dtype=torch.float32, device=DEV) for _ in range(8)]
    del held


def _draw(lens, H, HV, *, varlen, h0=True, l2=False, zero_heads=0, strong_heads=0, strong=8.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    q, k, v, g, beta, s0 = make_inputs(B, T, H, HV, 128, 128, h0=h0, num_seqs=len(lens),
                                       zero_gate_heads=zero_heads, generator=gen)
    if strong_heads:
        g[..., -strong_heads:] = -strong * torch.rand(B, T, strong_heads, generator=gen, dtype=torch.float64)
    if l2:                      # in-kernel normalisation: feed unnormalised q and k
        k = k * (1 + 3 * torch.rand(k.shape[:-1], generator=gen, dtype=torch.float64))[..., None]
    else:
        q = torch.nn.functional.normalize(q, dim=-1)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32) if varlen else None
    return q, k, v, g, beta, s0, cu


def _check(lens, H, HV, *, varlen, h0=True, l2=False, v_first=False, final=True, d_final=True, d_out=True,
           zero_heads=0, strong_heads=0, strong=8.0, dtype=torch.bfloat16, seed=0, context_parallel=None):
    _hopper()
    q, k, v, g, beta, s0, cu = _draw(lens, H, HV, varlen=varlen, h0=h0, l2=l2, zero_heads=zero_heads,
                                     strong_heads=strong_heads, strong=strong, seed=seed)
    if s0 is not None and v_first:
        s0 = s0.transpose(-1, -2).contiguous()
    # The reference sees the inputs the kernels see: rounding the inputs is the caller's, not the kernels' error.
    q, k, v = (x.to(dtype).double() for x in (q, k, v))
    g, beta = g.float().double(), beta.float().double()
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(*v.shape, generator=gen, dtype=torch.float64)
    N = len(lens)
    dht = torch.randn(N, HV, 128, 128, generator=gen, dtype=torch.float64)
    kw = dict(scale=0.1, output_final_state=final, use_qk_l2norm_in_kernel=l2, state_v_first=v_first,
              cu_seqlens=None if cu is None else cu.to(DEV))

    def grads(inputs, backend, **split):
        leaves = [x.to(DEV).requires_grad_() if x is not None else None for x in inputs]
        o, s = flashdelta.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], backend=backend, **kw,
                                                 **split)
        loss = 0
        if d_out:
            loss = loss + (o.double() * do.to(DEV)).sum()
        if final and d_final:
            loss = loss + (s.double() * dht.to(DEV)).sum()
        wrt = [x for x in leaves if x is not None]
        got = torch.autograd.grad(loss, wrt, allow_unused=True)      # q is unused by the final state alone
        return o, s, {n: torch.zeros_like(x) if d is None else d for n, x, d in zip(NAMES, wrt, got)}

    o_ref, s_ref, g_ref = grads((q, k, v, g, beta, s0), "torch")
    _poison(4 * sum(lens) * HV * 128)
    low = [x.to(dtype) for x in (q, k, v)] + [g.float(), beta.float(), None if s0 is None else s0.float()]
    split = {} if context_parallel is None else {"context_parallel": context_parallel}
    assert flashdelta.explain(*[x.to(DEV).requires_grad_() for x in low[:5]],
                              initial_state=None if s0 is None else low[5].to(DEV), cu_seqlens=kw["cu_seqlens"],
                              **split).endswith("; TileLang backward" + (", context parallel" if split else ""))
    o, s, g_got = grads(low, "auto", **split)
    errs = {"o": rel_err(o, o_ref)}
    if final:
        errs["ht"] = rel_err(s, s_ref)
    errs.update({n: rel_err(g_got[n], g_ref[n]) for n in g_ref})
    bad = {n: e for n, e in errs.items() if not e <= TOL[n]}
    assert not bad, f"errors {errs}"
    return errs


@pytest.mark.parametrize("lens,heads,segment_chunks", [
    ([8192], (2, 4), 16),                    # one long sequence: 8 segments, g = 0, tiny and strong decay
    ([3000, 64, 1, 5000], (2, 8), 8),        # varlen: long and short sequences, one of one token
    ([4096, 4096], (4, 8), True),            # the planner's segment length
    ([131072], (1, 2), True),                # issue 16's long sequence
])
def test_context_parallel_backward(lens, heads, segment_chunks):
    """The backward on the forward's segments (``hopper/context_parallel_backward.py``)."""
    _check(lens, *heads, varlen=len(lens) > 1, zero_heads=1, strong_heads=1, v_first=len(lens) == 4,
           context_parallel=segment_chunks)


def test_gate_gradient_at_strong_decay():
    """g down to -30 a token (transformers' random init reaches -29): dg within FLA's tolerance and not
    the outlier among the gradients (the fp32 in-chunk cumsum's error showed there first)."""
    errs = _check([1000, 300], 2, 4, varlen=True, strong_heads=3, strong=30.0)
    assert errs["dg"] <= 3 * max(errs["dq"], errs["dk"], errs["dv"]), f"errors {errs}"


@pytest.mark.parametrize("T", [1, 63, 65, 1000])
def test_lengths(T):
    _check([T], 1, 2, varlen=False)


def test_batched_random_shape():
    _check([300, 300], 2, 4, varlen=False, zero_heads=1, strong_heads=1)


def test_varlen_empty_and_single_token_sequences():
    _check([0, 1, 129, 0, 270], 2, 2, varlen=True)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_gva(group):
    _check([200, 77], 2, 2 * group, varlen=True, zero_heads=1, strong_heads=1)


def test_l2norm_state_v_first_fp16():
    _check([150, 250], 1, 2, varlen=True, l2=True, v_first=True, dtype=torch.float16)


def test_no_initial_state_no_final_state():
    _check([190], 2, 2, varlen=False, h0=False, final=False)


def test_final_state_gradient_alone():
    _check([130, 64], 1, 2, varlen=True, d_out=False)


def test_output_gradient_alone_with_final_state():
    _check([130, 64], 1, 2, varlen=True, d_final=False)


def test_long_sequence():
    _check([65600], 1, 2, varlen=False, zero_heads=1)


def test_frozen_inputs_get_no_gradient():
    _hopper()
    q, k, v, g, beta, s0, _ = _draw([200], 1, 2, varlen=False)
    q, k, v = (x.to(DEV, torch.bfloat16) for x in (q, k, v))
    g, beta, s0 = (x.to(DEV, torch.float32) for x in (g, beta, s0))
    v.requires_grad_()
    o, _ = flashdelta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    o.float().sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    assert all(x.grad is None for x in (q, k, g, beta, s0))


def test_same_gradients_run_to_run():
    _hopper()
    q, k, v, g, beta, s0, cu = _draw([300, 500], 2, 4, varlen=True)
    xs = [x.to(DEV, torch.bfloat16) for x in (q, k, v)] + [x.to(DEV, torch.float32) for x in (g, beta, s0)]
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in xs]
        o, s = flashdelta.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                                 cu_seqlens=cu.to(DEV))
        runs.append(torch.autograd.grad(o.float().square().sum() + s.sum(), leaves))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_each_kernel_against_its_stage():
    """The three backward kernels on the same inputs as their ``chunked_backward`` stage."""
    _hopper()
    from flashdelta.gated_delta_rule.hopper import backward as hb, forward as hf
    lens, H, HV = (130, 300), 1, 2
    q, k, v, g, beta, s0, cu = _draw(list(lens), H, HV, varlen=True)
    tokens = sum(lens)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    do = torch.randn(*v.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(2, HV, 128, 128, generator=gen, dtype=torch.float64)
    q16, k16, v16, do16 = (x.to(DEV, dtype).view(tokens, -1, 128) for x in (q, k, v, do))
    gf, bf = g.to(DEV, torch.float32).view(tokens, HV), beta.to(DEV, torch.float32).view(tokens, HV)
    _, chunks = hf._tables(lens, None, torch.device(DEV))
    seqs = hb._walk_table(lens, None, torch.device(DEV))
    a0g = torch.empty(tokens, HV, 64, dtype=dtype, device=DEV)
    ag, coef, _ = hf.prepare(q16, k16, gf, bf, chunks, HV, 0.1, False, a0g=a0g)
    NC = chunks.shape[0]
    states = torch.full((NC, HV, 128, 128), float("nan"), dtype=dtype, device=DEV)
    hf.entry(hf.recurrence_kernel("bfloat16", 128, save_states=True))(
        q16, k16, v16, ag, coef, seqs, s0.to(DEV, torch.float32).view(2, HV, -1), v16,
        hf.unused_rows(HV, 128 * 128, torch.float32, q16.device), states, 1, 0, 0)
    dstates, dv = torch.full_like(states, float("nan")), torch.full_like(v16, float("nan"))
    dh0 = torch.full((2, HV, 128 * 128), float("nan"), device=DEV)
    hb.entry(hb.walk_kernel("bfloat16", 64))(q16, k16, do16, ag, coef, seqs, dht.to(DEV, torch.float32).view(2, HV, -1),
                                               dv, dh0, dstates, 1, 1, 0)
    outs = [torch.full((tokens, H, 128), float("nan"), dtype=dtype, device=DEV) for _ in range(2)]
    outs += [torch.full((tokens, HV), float("nan"), device=DEV) for _ in range(2)]
    hb.entry(hb.gradients_kernel("bfloat16"))(q16, k16, v16, do16, dv, a0g, coef, chunks, states, dstates, *outs, 0.1,
                                              0)

    # the stages in float64 on the same (bf16-rounded) inputs
    layout = ChunkLayout.build(lens, None, torch.device(DEV))
    r = lambda x: x.to(DEV, dtype).double()  # noqa: E731
    qc, kc = (layout.gather(r(x).repeat_interleave(HV // H, dim=2)) for x in (q, k))
    vc, doc = layout.gather(r(v)), layout.gather(r(do))
    gc, bc = layout.gather(g.to(DEV)), layout.gather(beta.to(DEV))
    S = spec.chunk_entry_states(kc, vc, gc, bc, s0.to(DEV))
    dS, dvc, dh0_ref = spec.state_gradient_walk(qc, kc, gc, bc, 0.1, doc, dht.to(DEV))
    # chunk-layout [N, HV, NC_max, ...] -> the kernels' packed chunk order
    per_chunk = lambda x: torch.cat([x[n, :, :-(-L // 64)].transpose(0, 1) for n, L in enumerate(lens)])  # noqa: E731
    errs = {"states": rel_err(states.transpose(-1, -2), per_chunk(S)),
            "dstates": rel_err(dstates.transpose(-1, -2), per_chunk(dS)),
            "dv": rel_err(dv.view(1, tokens, HV, 128), layout.scatter(dvc, 1, tokens)),
            "dh0": rel_err(dh0.view(2, HV, 128, 128), dh0_ref)}
    # stage 3 from the kernels' own S, dS' and dv, so that its error is its own
    S_k = torch.zeros_like(S)
    dS_k = torch.zeros_like(dS)
    first = 0
    for n, L in enumerate(lens):
        nc = -(-L // 64)
        S_k[n, :, :nc] = states[first:first + nc].transpose(0, 1).transpose(-1, -2).double()
        dS_k[n, :, :nc] = dstates[first:first + nc].transpose(0, 1).transpose(-1, -2).double()
        first += nc
    dv_k = layout.gather(dv.view(1, tokens, HV, 128).double())
    ref = spec.chunk_local_gradients(qc, kc, vc, gc, bc, 0.1, S_k, dS_k, doc, dv_k)
    for name, got, want in zip(("dq", "dk", "dbeta", "dg"), outs, ref):
        want = layout.scatter(want if want.dim() == 5 else want[..., None], 1, tokens)
        if name in ("dq", "dk"):                                   # the kernel sums each GVA group
            want = want.view(1, tokens, H, HV // H, 128).sum(3)
        errs[name] = rel_err(got.view(want.shape), want)
    bad = {n: e for n, e in errs.items() if not e <= 1e-2}
    assert not bad, f"errors {errs}"


@pytest.mark.parametrize("context_parallel", [False, 4])
def test_forward_stores_the_states_the_recompute_gives(context_parallel):
    """The states the forward stores for its backward (``save_states``) against the backward's own
    recompute: equal for the unsplit forward, within the truncation's error for the segmented one."""
    _hopper()
    from flashdelta.gated_delta_rule.hopper import backward as hb, context_parallel as hcp, forward as hf
    from flashdelta.gated_delta_rule.planner import plan_forward
    lens, H, HV = (700, 300), 2, 4
    q, k, v, g, beta, s0, cu = _draw(list(lens), H, HV, varlen=True, zero_heads=1, strong_heads=1)
    q, k, v = (x.to(DEV, torch.bfloat16) for x in (q, k, v))
    g, beta, s0, cu = g.to(DEV, torch.float32), beta.to(DEV, torch.float32), s0.to(DEV, torch.float32), cu.to(DEV)
    args = (q, k, v, g, beta, 0.1, s0, True, False, cu, lens, False)
    _poison(sum(-(-n // 64) for n in lens) * HV * 128 * 128)
    if context_parallel:
        plan = plan_forward(lens, HV, 128, 132, context_parallel)
        o, ht, states = hcp.hopper_cp_forward(*args, plan, save_states=True)
        o_ref, ht_ref = hcp.hopper_cp_forward(*args, plan)
    else:
        o, ht, states = hf.hopper_forward(*args, save_states=True)
        o_ref, ht_ref = hf.hopper_forward(*args)
    assert torch.equal(o, o_ref) and torch.equal(ht, ht_ref)          # storing changes nothing else
    tokens = sum(lens)
    _, chunks = hf._tables(lens, None, q.device)
    qf, kf, vf = q.view(tokens, H, 128), k.view(tokens, H, 128), v.view(tokens, HV, 128)
    ag, coef, _ = hf.prepare(qf, kf, g, beta, chunks, HV, 0.1, False)
    want = torch.full_like(states, float("nan"))
    hf.entry(hf.recurrence_kernel("bfloat16", 128, save_states=True))(
        qf, kf, vf, ag, coef, hb._walk_table(lens, None, q.device), s0.view(2, HV, -1), vf,
        hf.unused_rows(HV, 128 * 128, torch.float32, q.device), want, 1, 0, 0)
    err = rel_err(states, want)
    assert err <= (1e-2 if context_parallel else 1e-6), f"stored states off the recompute by {err}"


@pytest.mark.parametrize("lens,heads,cp", [([300, 500], (2, 4), None), ([1000, 64, 1], (1, 2), 4),
                                           ([2048], (2, 2), None)])
def test_backward_from_stored_states(monkeypatch, lens, heads, cp):
    """Autograd with the forward storing its per-chunk states for the backward (no recompute)."""
    from flashdelta.gated_delta_rule import planner
    monkeypatch.setitem(planner.TUNING, "forward_stores_states", True)
    _check(lens, *heads, varlen=len(lens) > 1, zero_heads=1, strong_heads=1, context_parallel=cp)


def test_walk_and_recompute_tiles():
    """Every (state recompute, state-gradient walk) V tile the planner may choose gives the gradients
    of the verified pair (128, 64)."""
    _hopper()
    from flashdelta.gated_delta_rule.hopper import backward as hb
    lens, H, HV = [700, 300], 2, 4
    q, k, v, g, beta, s0, cu = _draw(lens, H, HV, varlen=True, zero_heads=1, strong_heads=1)
    q, k, v = (x.to(DEV, torch.bfloat16) for x in (q, k, v))
    g, beta, s0, cu = g.to(DEV, torch.float32), beta.to(DEV, torch.float32), s0.to(DEV, torch.float32), cu.to(DEV)
    gen = torch.Generator(device=DEV).manual_seed(1)
    do = torch.randn(v.shape, generator=gen, device=DEV, dtype=torch.bfloat16)
    dht = torch.randn(s0.shape, generator=gen, device=DEV)
    args = (q, k, v, g, beta, 0.1, s0, False, cu, tuple(lens), False, do, dht)
    want = hb.hopper_backward(*args, walk_tile=64, state_tile=128)
    for state_tile in (128, 64):
        for walk_tile in (128, 64):
            _poison(sum(lens) * HV * 128 * 4)
            got = hb.hopper_backward(*args, walk_tile=walk_tile, state_tile=state_tile)
            errs = {n: rel_err(a, e) for n, a, e in zip(NAMES, got, want)}
            assert all(e <= 1e-3 for e in errs.values()), f"tiles {state_tile}/{walk_tile}: {errs}"
