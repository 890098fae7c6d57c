"""State checkpoints (``checkpoint_every`` / ``checkpoints``) against the token loop's states."""
import pytest
import torch

import flashdelta
from flashdelta import checkpoint_offsets, chunk_gated_delta_rule
from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule
from helpers import make_inputs, rel_err

H, HV, K, V = 1, 2, 8, 8


def draw(lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g, beta, h0 = make_inputs(1, sum(lens), H, HV, K, V, generator=gen, num_seqs=len(lens))
    return q, k, v, g, beta, h0, torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])


def token_loop_states(q, k, v, g, beta, h0, cu, n, t):
    """The state of sequence n after its first t tokens (float64)."""
    a = cu[n].item()
    s = slice(a, a + t)
    return naive_gated_delta_rule(q[:, s], k[:, s], v[:, s], g[:, s], beta[:, s], initial_state=h0[n:n + 1],
                                  output_final_state=True)[1][0]


@pytest.mark.parametrize("every", [64, 128])
@pytest.mark.parametrize("v_first", [False, True])
def test_states_every_n_tokens(every, v_first):
    lens = [300, 64, 0, 129, 10]
    q, k, v, g, beta, h0, cu = draw(lens)
    offsets = checkpoint_offsets(lens, every)
    assert offsets == checkpoint_offsets(cu, every)
    shape = (offsets[-1], HV, V, K) if v_first else (offsets[-1], HV, K, V)
    buf = torch.full(shape, float("nan"), dtype=torch.float64)
    init = h0.transpose(-1, -2) if v_first else h0
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=init, cu_seqlens=cu, state_v_first=v_first,
                                  checkpoint_every=every, checkpoints=buf)
    assert rel_err(o, naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)[0]) < 1e-12
    got = buf.transpose(-1, -2) if v_first else buf
    for n, L in enumerate(lens):
        for j in range(L // every):
            want = token_loop_states(q, k, v, g, beta, h0, cu, n, (j + 1) * every)
            assert rel_err(got[offsets[n] + j], want) < 1e-12, (n, j)


def test_pool_prefill_with_checkpoints_in_bf16():
    lens = [256, 70]
    q, k, v, g, beta, h0, cu = (x.float() if x.is_floating_point() else x for x in draw(lens, seed=1))
    pool = torch.zeros(4, HV, K, V)
    pool[[3, 0]] = h0
    buf = torch.empty(checkpoint_offsets(lens, 128)[-1], HV, K, V, dtype=torch.bfloat16)
    chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, state_indices=torch.tensor([3, 0]), cu_seqlens=cu,
                           checkpoint_every=128, checkpoints=buf)
    for j, t in enumerate((128, 256)):
        want = token_loop_states(*(x.double() for x in (q, k, v, g, beta, h0)), cu, 0, t)
        assert rel_err(buf[j], want) < 2 ** -8


@pytest.mark.parametrize("kw,error,match", [
    ({"checkpoint_every": 64}, ValueError, "pass both"),
    ({"checkpoint_every": 100, "checkpoints": torch.zeros(1)}, ValueError, "a positive multiple of 64"),
    ({"checkpoint_every": 64, "checkpoints": torch.zeros(3, HV, K, V)}, ValueError, r"expected shape \[rows, HV, K, V\]"),
    ({"checkpoint_every": 64, "checkpoints": torch.zeros(2, HV, K, V, dtype=torch.int32)}, TypeError, "float32"),
    ({"checkpoint_every": 64, "checkpoints": torch.zeros(2, HV, K, V), "context_parallel": True}, ValueError,
     "unsplit walk"),
])
def test_bad_arguments(kw, error, match):
    q, k, v, g, beta, h0, cu = draw([130, 10])
    with pytest.raises(error, match=match):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu, **kw)
    assert flashdelta.checkpoint_offsets is checkpoint_offsets


def test_kernels_form_picks_the_same_states():
    """``store_entering`` (the kernels' per-chunk entry states) fills the buffer as ``store`` does."""
    from flashdelta.gated_delta_rule.checkpoints import Checkpoints
    lens = (300, 128, 0, 64)
    gen = torch.Generator().manual_seed(4)
    chunk_counts = [-(-L // 64) for L in lens]
    after = [torch.randn(c, HV, K, V, generator=gen, dtype=torch.float64) for c in chunk_counts]  # after each chunk
    entering = torch.cat([torch.cat([torch.zeros(1, HV, K, V, dtype=torch.float64), a[:-1]]) for a in after if len(a)])
    final = torch.stack([a[-1] if len(a) else torch.zeros(HV, K, V, dtype=torch.float64) for a in after])
    width = max(chunk_counts)
    padded = torch.stack([torch.cat([a, a[-1:].expand(width - len(a), -1, -1, -1)]) if len(a) else
                          torch.zeros(width, HV, K, V, dtype=torch.float64) for a in after])     # [N, NC, K, V]
    for every in (64, 128):
        rows = checkpoint_offsets(lens, every)[-1]
        want, got = (Checkpoints(torch.zeros(rows, HV, K, V, dtype=torch.float64), every) for _ in range(2))
        want.store(padded.permute(0, 2, 1, 3, 4), lens, False)                  # [N, HV, NC, K, V]
        got.store_entering(entering.transpose(-1, -2), final, lens, False)
        assert torch.equal(got.buffer, want.buffer), every
