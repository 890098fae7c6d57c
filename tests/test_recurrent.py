"""fused_recurrent_gated_delta_rule: FLA's decode entry point, exact against the token loop."""
import pytest
import torch

import flashdelta
from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule
from helpers import make_inputs, rel_err


def test_decode_steps_continue_a_prefill():
    """Prefill with the chunked op, then one token at a time from its final state, as generate() does."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g, beta, h0 = make_inputs(2, 40, 2, 4, 16, 16, generator=gen)
    want, want_state = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
    o, state = flashdelta.chunk_gated_delta_rule(q[:, :30], k[:, :30], v[:, :30], g[:, :30], beta[:, :30],
                                                 initial_state=h0, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
    outs = [o]
    for t in range(30, 40):
        s = slice(t, t + 1)
        o, state = flashdelta.fused_recurrent_gated_delta_rule(q[:, s], k[:, s], v[:, s], g=g[:, s], beta=beta[:, s],
                                                               initial_state=state, output_final_state=True,
                                                               use_qk_l2norm_in_kernel=True, use_cache=True)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), want) < 1e-12 and rel_err(state, want_state) < 1e-12


def test_defaults_and_varlen():
    gen = torch.Generator().manual_seed(1)
    q, k, v, _, _, h0 = make_inputs(1, 3, 1, 2, 8, 8, generator=gen, num_seqs=3)
    cu = torch.tensor([0, 1, 2, 3])                      # three sequences of one token: a decode batch
    o, s = flashdelta.fused_recurrent_gated_delta_rule(q, k, v, initial_state=h0, output_final_state=True,
                                                       cu_seqlens=cu)
    ones, zeros = torch.ones(1, 3, 2, dtype=q.dtype), torch.zeros(1, 3, 2, dtype=q.dtype)
    want = naive_gated_delta_rule(q, k, v, zeros, ones, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, want[0]) < 1e-12 and rel_err(s, want[1]) < 1e-12


@pytest.mark.parametrize("kw,error,match", [
    ({"gk": torch.zeros(1)}, NotImplementedError, "`gk` / `gv`"),
    ({"use_gate_in_kernel": True, "A_log": torch.zeros(2)}, ValueError, "`g`: the raw gate input is required"),
    ({"use_beta_sigmoid_in_kernel": True}, ValueError, "`beta`: the logits are required"),
])
def test_bad_arguments(kw, error, match):
    q, k, v, *_ = make_inputs(1, 3, 1, 2, 8, 8)
    with pytest.raises(error, match=match):
        flashdelta.fused_recurrent_gated_delta_rule(q, k, v, **kw)
