"""Every Hopper kernel variant builds for sm_90a on a machine without a GPU, with wgmma and TMA."""
import shutil

import pytest

pytestmark = pytest.mark.compile

tilelang = pytest.importorskip("tilelang")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc not on PATH: cannot build sm_90a kernels", allow_module_level=True)

from flashdelta.compile import build_all, features, required  # noqa: E402
from flashdelta.gated_delta_rule.hopper.forward import variants  # noqa: E402

NAMES = [name for name, _ in variants()]


@pytest.fixture(scope="module")
def sources():
    """All variants built once, in parallel (CI has two cores)."""
    return {name: source for name, _, source in build_all()}


@pytest.mark.parametrize("name", NAMES)
def test_variant_builds_with_wgmma_and_tma(sources, name):
    source = sources[name]
    if isinstance(source, Exception):
        raise source
    found = features(source)
    for feature in required(name):
        assert found[feature], f"{name}: no {feature} in the generated CUDA"
    if name.startswith("chunk_recurrence"):     # the auto warp-specialised pipeline
        assert found["mbarrier"] and found["setmaxnreg"], f"{name}: not warp-specialised"
