"""Every Hopper kernel variant builds for sm_90a on a machine without a GPU, with wgmma and TMA."""
import re
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
    if name.startswith("chunk_recurrence"):     # the hand-written warp-specialised pipeline
        assert found["mbarrier"] and found["setmaxnreg"], f"{name}: not warp-specialised"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("chunk_recurrence")])
def test_register_requests_fit_the_launch_allocation(sources, name):
    """setmaxnreg.inc waits until the CTA's own pool has the registers: a request beyond it hangs.
    The pool is the launch allocation, ptxas's per-thread maximum for the launch bounds times the
    threads; the auxiliary warpgroup gives registers back (dealloc), the consumers take them (alloc)."""
    source = sources[name]
    threads = int(re.search(r"__launch_bounds__\((\d+)", source).group(1))
    gives = [int(x) for x in re.findall(r"warpgroup_reg_dealloc<(\d+)>", source)]
    takes = [int(x) for x in re.findall(r"warpgroup_reg_alloc<(\d+)>", source)]
    assert len(gives) == 1 and len(takes) == 1, f"{name}: expected one dealloc and one alloc"
    per_thread = min(240, 65536 // threads // 8 * 8)      # what ptxas reported for 256 and 384 threads
    consumers = threads - 128
    assert gives[0] * 128 + takes[0] * consumers <= per_thread * threads, \
        f"{name}: asks {takes[0]} x {consumers} + {gives[0]} x 128 registers of a {per_thread} x {threads} pool"
