"""Benchmark configurations: the presets of DESIGN section 5 and parsing of command-line ones."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

MODES = ("fwd", "fwdbwd")
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Config:
    """One benchmark shape.

    ``varlen=False``: ``len(lengths)`` equal sequences as a ``[B, T]`` batch.
    ``varlen=True``: the sequences packed along T with ``B = 1`` and ``cu_seqlens``.
    """

    lengths: tuple[int, ...]
    varlen: bool
    hk: int
    hv: int
    k_dim: int = 128
    v_dim: int = 128
    dtype: str = "bf16"
    mode: str = "fwd"
    l2norm: bool = False            # raw q, k normalised inside each implementation (use_qk_l2norm_in_kernel)

    def __post_init__(self):
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ValueError(f"sequence lengths must be positive, got {self.lengths}")
        if not self.varlen and len(set(self.lengths)) != 1:
            raise ValueError(f"a dense batch needs equal lengths, got {self.lengths} (use varlen)")
        if self.hk <= 0 or self.hv % self.hk != 0:
            raise ValueError(f"hv must be a positive multiple of hk, got hk={self.hk}, hv={self.hv}")
        if self.k_dim <= 0 or self.v_dim <= 0:
            raise ValueError(f"head dims must be positive, got K={self.k_dim}, V={self.v_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    @property
    def shape_label(self) -> str:
        if self.varlen:
            return "+".join(str(n) for n in self.lengths)
        return f"{self.num_seqs}x{self.lengths[0]}"

    @property
    def label(self) -> str:
        extra = "" if (self.k_dim, self.v_dim) == (128, 128) else f" K{self.k_dim}V{self.v_dim}"
        extra += "" if self.dtype == "bf16" else f" {self.dtype}"
        extra += " l2norm" if self.l2norm else ""
        return f"{self.shape_label} h{self.hk}/{self.hv}{extra}"


# DESIGN section 5 (Qwen3.5 family, K = V = 128).
FWD_HEADS = ((2, 8), (4, 16), (8, 32), (16, 64), (16, 32), (8, 24), (16, 48), (16, 16), (32, 32))
FWD_SINGLE = (32768, 16384, 8192, 4096, 2048)
FWD_VARLEN = ((28672, 4096), (16384, 16384), (12288, 4096), (4096, 4096), (1024, 7168))
FWD_BATCHED = ((8192, 4), (4096, 8), (2048, 4), (1024, 8))     # (length, count)
BWD_HEADS = ((16, 32), (8, 16), (4, 8), (2, 4))
BWD_TOTALS = (8192, 32768)
BWD_SEQS = (1, 2, 4, 8)
PRESETS = ("quick", "qwen35-fwd", "qwen35-bwd")
# Small enough for the PyTorch path on a 2-core CPU (the whole preset in well under a minute).
QUICK = (((2048,), False, 2, 8), ((1536, 512), True, 2, 8), ((1024, 1024), False, 4, 16))


def preset(name: str, mode: str | None = None) -> list[Config]:
    """The configurations of a named preset; ``mode`` overrides the preset's own (quick only)."""
    if name == "quick":
        return [Config(lengths, varlen, hk, hv, mode=mode or "fwd") for lengths, varlen, hk, hv in QUICK]
    if name == "qwen35-fwd":
        shapes = [((n,), False) for n in FWD_SINGLE] + [(pair, True) for pair in FWD_VARLEN]
        shapes += [((n,) * count, False) for n, count in FWD_BATCHED]
        return [Config(lengths, varlen, hk, hv, mode="fwd") for hk, hv in FWD_HEADS for lengths, varlen in shapes]
    if name == "qwen35-bwd":
        return [Config((total // n,) * n, False, hk, hv, mode="fwdbwd")
                for hk, hv in BWD_HEADS for total in BWD_TOTALS for n in BWD_SEQS]
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"4096,4096"`` or ``"28672+4096"``: the lengths of packed (varlen) sequences."""
    parts = text.replace("+", ",").split(",")
    try:
        lengths = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise ValueError(f"--lengths: expected comma-separated integers, got {text!r}") from None
    if not lengths:
        raise ValueError(f"--lengths: no lengths in {text!r}")
    return lengths


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"16/32,2/8"`` -> [(16, 32), (2, 8)] as (hk, hv) pairs."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            hk, hv = (int(x) for x in item.split("/"))
        except ValueError:
            raise ValueError(f"--heads: expected hk/hv pairs like 16/32, got {item!r}") from None
        pairs.append((hk, hv))
    if not pairs:
        raise ValueError(f"--heads: no hk/hv pairs in {text!r}")
    return pairs


def custom(lengths: list[str], batch: int | None, seqlen: int | None, heads: list[tuple[int, int]],
           k_dim: int, v_dim: int, dtype: str, mode: str) -> list[Config]:
    """Configurations from ``--lengths`` (each one varlen set) and/or ``--batch/--seqlen``, for every head pair."""
    shapes = [(parse_lengths(text), True) for text in lengths]
    if seqlen is not None or batch is not None:
        if seqlen is None:
            raise ValueError("--batch needs --seqlen")
        shapes.append(((seqlen,) * (batch or 1), False))
    if not shapes:
        raise ValueError("give --preset, or --lengths and/or --seqlen [--batch]")
    return [Config(lens, varlen, hk, hv, k_dim, v_dim, dtype, mode) for hk, hv in heads for lens, varlen in shapes]


def from_results(record: dict, peer: str, below: float) -> list[Config]:
    """The configurations of an earlier run (its JSON record) where ``peer``'s time over flashdelta's
    (CUDA graph where both have it, else eager) is below ``below``: the rows to confirm by a rerun."""
    chosen = []
    for res in record["results"]:
        times = []
        for name in (peer, "flashdelta"):
            impl = res["impls"].get(name, {})
            times.append(next((impl[kind]["median_ms"] for kind in ("graph", "eager") if impl.get(kind)), None))
        if None not in times and times[0] / times[1] < below:
            saved = res["config"]                  # the runner's dataclasses.asdict(config), plus tokens
            # fields added since an older record was written take their defaults
            kwargs = {f.name: saved[f.name] if f.name in saved or f.default is MISSING else f.default
                      for f in fields(Config)}
            chosen.append(Config(**kwargs | {"lengths": tuple(kwargs["lengths"])}))
    return chosen


def restrict(configs: list[Config], heads: list[tuple[int, int]] | None = None,
             max_tokens: int | None = None) -> list[Config]:
    """Keep the preset configurations with the given head pairs and at most ``max_tokens`` tokens."""
    keep = [c for c in configs if heads is None or (c.hk, c.hv) in heads]
    return [c for c in keep if max_tokens is None or c.tokens <= max_tokens]
