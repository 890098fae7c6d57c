"""The public op inside a CUDA graph (needs a CUDA Hopper GPU; skipped elsewhere).

Capture fails on any host-device synchronisation, and a replay that reuses per-call host work (plans,
tables, offsets) wrongly would differ from an eager call: so this checks that repeated calls and
graph capture do no host work that depends on the data.
"""
import pytest
import torch
import torch.nn.functional as F

from flashdelta import chunk_gated_delta_rule

from helpers import make_inputs

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _draw(gen, B, T, num_seqs):
    """Fresh inputs on the GPU: q, k unit rows and bf16 like v; g, beta and h0 fp32."""
    q, k, v, g, beta, h0 = make_inputs(B, T, 2, 8, 128, 128, num_seqs=num_seqs, generator=gen)
    q = F.normalize(q, dim=-1)
    return dict(q=q.to(DEV, torch.bfloat16), k=k.to(DEV, torch.bfloat16), v=v.to(DEV, torch.bfloat16),
                g=g.to(DEV, torch.float32), beta=beta.to(DEV, torch.float32), h0=h0.to(DEV, torch.float32))


@pytest.mark.parametrize("lens,varlen,context_parallel", [
    ([8192] * 2, False, False),           # unsplit
    ([8192], False, True),                # context parallel, one sequence
    ([3000, 1100, 0, 64], True, True),    # context parallel over packed sequences, one of them empty
])
def test_replay_matches_eager(lens, varlen, context_parallel):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an SM90 (Hopper) GPU")
    gen = torch.Generator().manual_seed(0)
    B, T = (1, sum(lens)) if varlen else (len(lens), lens[0])
    static = _draw(gen, B, T, len(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV) if varlen else None

    def run():
        x = static
        return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                      output_final_state=True, cu_seqlens=cu, backend="tilelang",
                                      context_parallel=context_parallel)

    side = torch.cuda.Stream()                  # warm-up (plans, tables, kernels) off the capture stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph, ht_graph = run()

    for x, fresh in zip(static.values(), _draw(gen, B, T, len(lens)).values()):
        x.copy_(fresh)                          # new data in the captured buffers
    graph.replay()
    o, ht = run()
    torch.cuda.synchronize()
    assert torch.equal(o_graph, o) and torch.equal(ht_graph, ht)
