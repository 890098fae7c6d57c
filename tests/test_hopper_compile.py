"""Every Hopper kernel variant builds for sm_90a on a machine without a GPU, with wgmma and TMA."""
import shutil

import pytest

pytestmark = pytest.mark.compile

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc not on PATH: cannot build sm_90a kernels", allow_module_level=True)

from flashdelta.compile import features  # noqa: E402
from flashdelta.gated_delta_rule.hopper.forward import variants  # noqa: E402


@pytest.mark.parametrize("name,build", variants(), ids=[name for name, _ in variants()])
def test_variant_builds_with_wgmma_and_tma(name, build):
    found = features(build().get_kernel_source())
    assert found["wgmma"], f"{name}: no wgmma in the generated CUDA"
    assert found["tma"], f"{name}: no TMA load in the generated CUDA"
    if name.startswith("chunk_recurrence"):     # the auto warp-specialised pipeline
        assert found["mbarrier"] and found["setmaxnreg"], f"{name}: not warp-specialised"
