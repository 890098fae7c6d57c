"""The context-parallel driver, run on the PyTorch path: same results as the unsplit forward."""
import pytest
import torch

from flashdelta.gated_delta_rule.chunked import chunked_varlen_forward
from flashdelta.gated_delta_rule.context_parallel import TRUNCATION_TAU
from flashdelta.gated_delta_rule.cp_forward import context_parallel_forward
from flashdelta.gated_delta_rule.inputs import validate
from flashdelta.gated_delta_rule.planner import Plan, _segments
from helpers import make_inputs, rel_err


def run_both(lens, batched, tau, seg_chunks=2, H=1, HV=3, K=16, h0=True, state_v_first=False, decay=1.0,
             l2norm=False):
    gen = torch.Generator().manual_seed(sum(lens) + len(lens))
    B, T = (len(lens), lens[0]) if batched else (1, sum(lens))
    q, k, v, g, beta, s0 = make_inputs(B, T, H, HV, K, K, h0=h0, num_seqs=len(lens), generator=gen,
                                       zero_gate_heads=1)
    g = g * decay
    if state_v_first and s0 is not None:
        s0 = s0.transpose(-1, -2).contiguous()
    cu = None if batched else torch.tensor([0] + lens).cumsum(0)
    problem = validate(q, k, v, g, beta, s0, cu, None, state_v_first)
    plan = Plan(128, seg_chunks, _segments(problem.seq_lens, seg_chunks))
    args = (q, k, v, g, beta, 0.3, s0, True, l2norm)
    o, s = context_parallel_forward(chunked_varlen_forward, *args, problem, batched, state_v_first, plan, tau)
    if batched:
        flat = [x.reshape(1, -1, *x.shape[2:]) for x in (q, k, v, g, beta)]
        o_ref, s_ref = chunked_varlen_forward(*flat, *args[5:], None, problem.seq_lens, state_v_first)
        o_ref = o_ref.reshape(o.shape)
    else:
        o_ref, s_ref = chunked_varlen_forward(*args, cu, problem.seq_lens, state_v_first)
    return o, s, o_ref, s_ref


@pytest.mark.parametrize("lens,batched", [([700], True), ([300, 300], True), ([0, 500, 64, 0, 129, 1], False)])
@pytest.mark.parametrize("h0", [True, False])
def test_exact_cp_equals_unsplit(lens, batched, h0):
    o, s, o_ref, s_ref = run_both(lens, batched, None, h0=h0)
    assert rel_err(o, o_ref) <= 1e-10 and rel_err(s, s_ref) <= 1e-10


def test_exact_cp_state_v_first_and_l2norm():
    o, s, o_ref, s_ref = run_both([400, 200], False, None, state_v_first=True, l2norm=True, H=3)
    assert rel_err(o, o_ref) <= 1e-10 and rel_err(s, s_ref) <= 1e-10


def test_truncated_cp_within_bound_and_g0_head_exact():
    # strong decay: every segment of heads 1-2 truncates; head 0 (g = 0) takes the exact transition
    o, s, o_ref, s_ref = run_both([1500, 900], False, TRUNCATION_TAU, decay=8.0)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
    assert rel_err(o[..., 0, :], o_ref[..., 0, :]) <= 1e-10
