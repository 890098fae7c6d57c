"""The FLA backend's verifier on the CPU (FLA not needed), and FLA's dispatch reaching it on a GPU."""
import pytest
import torch

from flashdelta.gated_delta_rule import api
from flashdelta.integrations import fla as fd_fla
from helpers import make_inputs


def _call(**kw):
    q, k, v, g, beta, h0 = make_inputs(1, 70, 2, 4, 128, 128, dtype=torch.bfloat16)
    return dict(q=q, k=k, v=v, g=g.float(), beta=beta.float(), initial_state=h0.float()) | kw


def test_verifier_refuses_what_the_kernels_do_not_serve():
    ok, why = fd_fla.accepts(**_call())
    assert not ok and why.startswith("flashdelta would run its PyTorch path: tensors are on cpu")
    ok, why = fd_fla.accepts(**_call(cp_context=object()))
    assert not ok and "cp_context" in why
    ok, why = fd_fla.accepts(**_call(chunk_size=100))
    assert not ok and why.startswith("flashdelta refuses the arguments: `chunk_size`")
    ok, why = fd_fla.accepts(**_call(allow_neg_eigval=True))
    assert not ok and "requires `use_beta_sigmoid_in_kernel=True`" in why


def test_verifier_accepts_kernel_calls(monkeypatch):
    monkeypatch.setattr(api, "_tilelang_unavailable", lambda *a: None)
    monkeypatch.setattr(api, "sm_count", lambda device: 132)
    assert fd_fla.accepts(**_call(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                  allow_neg_eigval=True, use_cache=True)) == (True, None)
    ok, why = fd_fla.accepts(**_call(initial_state=torch.zeros(3, 4, 128, 128)))
    assert not ok and "`initial_state`: expected shape" in why


@pytest.mark.gpu
def test_fla_dispatch_reaches_flashdelta(monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    pytest.importorskip("fla")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    fd_fla.register()
    calls = []
    original = fd_fla.run
    monkeypatch.setattr(fd_fla, "run", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x = {n: t.cuda() for n, t in _call().items()}
    o, s = fla_chunk(**x, output_final_state=True)
    assert calls
    monkeypatch.setenv("FLA_FLASHDELTA", "0")
    monkeypatch.setenv("FLA_FLASH_QLA", "0")
    o_fla, s_fla = fla_chunk(**x, output_final_state=True)
    assert len(calls) == 1
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(o, o_fla) < 1e-2 and rel(s, s_fla) < 1e-2
