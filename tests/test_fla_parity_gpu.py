"""Both flashdelta paths give FLA's results on FLA's kind of inputs (needs a GPU and fla-core)."""
import os

import pytest
import torch
import torch.nn.functional as F

from flashdelta import chunk_gated_delta_rule
from helpers import rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("varlen", [False, True])
def test_matches_fla(backend, varlen):
    os.environ["FLA_FLASH_QLA"] = "0"          # FLA's own Triton kernels, not its FlashQLA dispatch
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    torch.manual_seed(0)
    B, T, H, HV, D = (1, 3000, 2, 8, 128) if varlen else (2, 1500, 2, 8, 128)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, T, HV, D, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, HV, device="cuda")) / 16
    beta = torch.rand(B, T, HV, device="cuda").sigmoid()
    n = 3 if varlen else B
    h0 = torch.randn(n, HV, D, D, device="cuda")
    cu = torch.tensor([0, 1000, 1100, 3000], device="cuda", dtype=torch.int32) if varlen else None
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    o_ref, s_ref = fla.chunk_gated_delta_rule(q, k, v, g, beta, **kw)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, backend=backend, **kw)
    # the torch path computes in fp32; the kernels, like FLA's, round operands to bf16, so two
    # implementations each within 5e-3 of the truth (tests/test_hopper_gpu.py) may differ by more
    tol = 5e-3 if backend == "torch" else 1e-2
    assert rel_err(o, o_ref) <= tol and rel_err(s, s_ref) <= tol
