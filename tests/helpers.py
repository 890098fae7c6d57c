"""Shared test helpers: random inputs and the relative error measure."""
import torch
import torch.nn.functional as F


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error ||a - e|| / ||e|| (FLA's tolerance measure)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, HV, K, V, *, dtype=torch.float64, device="cpu", h0=True, num_seqs=None,
                zero_gate_heads=0, strong_decay=False, generator=None):
    """Random GDN inputs as FLA's tests draw them: l2-normalised k, beta in (0, 1), g <= 0.

    ``zero_gate_heads`` value heads get g = 0 (no decay); ``strong_decay`` draws g down to -20.
    """
    gen = generator
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    q = rnd(B, T, H, K)
    k = F.normalize(rnd(B, T, H, K), dim=-1)
    v = rnd(B, T, HV, V)
    if strong_decay:
        g = -20 * torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    else:
        g = F.logsigmoid(rnd(B, T, HV)) / 4
    g[..., :zero_gate_heads] = 0
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    n = num_seqs if num_seqs is not None else B
    s0 = rnd(n, HV, K, V) if h0 else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return [cast(x) for x in (q, k, v)] + [cast(g), cast(beta), cast(s0)]
