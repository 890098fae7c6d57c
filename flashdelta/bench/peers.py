"""The implementations compared: flashdelta, FLA's Triton path, FlashQLA, FlashInfer, and a float64 token loop.

Each is found at run time; ``load()`` returns a one-line reason when it cannot run here. Every
implementation also reports which code path really ran (``path()``), checked on the first call.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from .configs import Config
from .inputs import GRAD_NAMES, InputSet


def requested(spec: str) -> set[str]:
    """The peers a comma list names ("fla", "flashqla", "flashinfer"; "none" or empty for none), lower case."""
    wanted = {p.strip().lower() for p in spec.split(",")} - {"none", ""}
    unknown = wanted - {"fla", "flashqla", "flashinfer"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}")
    return wanted


@contextlib.contextmanager
def spy(module, attr: str):
    """Count calls of ``module.attr`` while the block runs (the callee looks it up at call time)."""
    original = getattr(module, attr)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    setattr(module, attr, wrapper)
    try:
        yield calls
    finally:
        setattr(module, attr, original)


def run(impl, inp: InputSet, cfg: Config) -> dict[str, torch.Tensor]:
    """One call: outputs, plus the gradients of every input in fwd+bwd mode."""
    if cfg.mode == "fwd":
        with torch.no_grad():
            o, ht = impl(inp)
        return {"o": o, "ht": ht}
    o, ht = impl(inp)
    grads = torch.autograd.grad((o, ht), inp.leaves, (inp.do.to(o.dtype), inp.dht.to(ht.dtype)))
    return {"o": o, "ht": ht, **dict(zip(GRAD_NAMES, grads))}


def backward_only(impl, inp: InputSet):
    """The backward alone: one forward with autograd now, then a function that takes the gradients of
    that forward's outputs again (the autograd graph is kept, so every call redoes the same backward)."""
    o, ht = impl(inp)
    seeds = (inp.do.to(o.dtype), inp.dht.to(ht.dtype))
    return lambda: torch.autograd.grad((o, ht), inp.leaves, seeds, retain_graph=True)


class Impl:
    name = ""
    timed = True                # False: used only as a correctness reference

    def load(self, device: torch.device) -> str | None:
        """None when usable on ``device``, else why not (one line)."""
        raise NotImplementedError

    def applies(self, cfg: Config) -> str | None:
        """None when this configuration can run, else why not."""
        return None

    def __call__(self, inp: InputSet):
        raise NotImplementedError

    @contextlib.contextmanager
    def watch(self):
        """Around the first call: yields a function that then says which code path ran."""
        yield lambda: self.description

    description = ""


class FlashDelta(Impl):
    name = "flashdelta"

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._path = None           # set by the first call inside watch()

    def load(self, device):
        from flashdelta import chunk_gated_delta_rule
        self.fn = chunk_gated_delta_rule
        return None

    def _kwargs(self, inp):
        return dict(initial_state=inp.h0, cu_seqlens=inp.cu_seqlens, cu_seqlens_cpu=inp.cu_seqlens_cpu,
                    use_qk_l2norm_in_kernel=inp.l2norm, backend=self.backend)

    def __call__(self, inp):
        if self._path == "":
            from flashdelta import explain          # the op's own account of the path it takes
            self._path = explain(inp.q, inp.k, inp.v, inp.g, inp.beta, **self._kwargs(inp))
        return self.fn(inp.q, inp.k, inp.v, inp.g, inp.beta, output_final_state=True, **self._kwargs(inp))

    @contextlib.contextmanager
    def watch(self):
        self._path = ""
        try:
            yield lambda: self._path
        finally:
            self._path = None


class FLATriton(Impl):
    """fla-core's chunk_gated_delta_rule with its FlashQLA backend switched off (FLA_FLASH_QLA=0)."""

    name = "FLA"

    def load(self, device):
        if device.type != "cuda":
            return "needs a CUDA GPU"
        # fla 0.6.0 dispatches chunk_gated_delta_rule to FlashQLA (when importable) unless this is "0";
        # it reads the variable on every call, and setting it before the import keeps any import-time use right.
        os.environ["FLA_FLASH_QLA"] = "0"
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        except Exception as err:            # absent, or broken against this torch/triton
            return f"fla-core not importable ({type(err).__name__}: {_first_line(err)})"
        self.fn = chunk_gated_delta_rule
        return None

    def __call__(self, inp):
        cu = cu_cpu = None
        if inp.cu_seqlens is not None:
            cu, cu_cpu = _long_offsets(inp)
        return self.fn(inp.q, inp.k, inp.v, inp.g, inp.beta, initial_state=inp.h0, output_final_state=True,
                       use_qk_l2norm_in_kernel=inp.l2norm, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)

    @contextlib.contextmanager
    def watch(self):
        flash_qla = sys.modules.get("flash_qla")
        if flash_qla is None:
            try:
                import flash_qla
            except Exception:                # then FLA cannot dispatch to it either
                yield lambda: "Triton (flash_qla not importable)"
                return
        with spy(flash_qla, "chunk_gated_delta_rule") as calls:
            yield lambda: _fla_path(calls)


def _fla_path(calls) -> str:
    if calls:
        raise RuntimeError("FLA dispatched to FlashQLA although FLA_FLASH_QLA=0")
    return "Triton (FLA_FLASH_QLA=0; flash_qla not called)"


def _long_offsets(inp: InputSet):
    """FLA takes int64 offsets. Made once per input set and kept, so FLA's per-tensor caches hit as in a model."""
    if not hasattr(inp, "_fla_offsets"):
        inp._fla_offsets = (inp.cu_seqlens.long(), inp.cu_seqlens_cpu.long())
    return inp._fla_offsets


class FlashQLA(Impl):
    name = "FlashQLA"

    def load(self, device):
        if device.type != "cuda":
            return "needs a CUDA GPU"
        try:
            import flash_qla
        except Exception as err:            # absent, or no kernels for this GPU (it checks at import)
            return f"flash_qla not importable ({type(err).__name__}: {_first_line(err)})"
        # Held directly, so the spy on flash_qla.chunk_gated_delta_rule (FLA's dispatch check) never counts us.
        self.fn = flash_qla.chunk_gated_delta_rule
        return None

    def applies(self, cfg):
        if (cfg.k_dim, cfg.v_dim) != (128, 128):
            return "FlashQLA needs K = V = 128"
        if cfg.dtype == "fp32":
            return "FlashQLA takes bf16/fp16 only"
        return None

    def __call__(self, inp):
        return self.fn(inp.q, inp.k, inp.v, inp.g, inp.beta, initial_state=inp.h0, output_final_state=True,
                       use_qk_l2norm_in_kernel=inp.l2norm, cu_seqlens=inp.cu_seqlens)

    description = "flash_qla.chunk_gated_delta_rule (auto_cp=True)"


class FlashInfer(Impl):
    """FlashInfer's SM90 GDN prefill (``flashinfer.gdn_prefill.chunk_gated_delta_rule``), forward only.

    Its conventions differ from FLA's: packed ``[T, H, D]`` inputs with int32 ``cu_seqlens`` (a dense
    batch is B sequences back to back), the gate itself (``alpha = exp(g)``) instead of its log, and
    V-major states ``[N, HV, V, K]``. The inputs are converted once per input set, outside the timed
    calls; its outputs are viewed back in FLA's layouts for the cross-check."""

    name = "FlashInfer"
    description = "flashinfer.gdn_prefill.chunk_gated_delta_rule (use_cp=auto)"

    def load(self, device):
        if device.type != "cuda":
            return "needs a CUDA GPU"
        try:
            import flashinfer.gdn_prefill as prefill
        except Exception as err:            # absent, or its CUTLASS DSL not on the path
            return f"flashinfer.gdn_prefill not importable ({type(err).__name__}: {_first_line(err)})"
        self.fn = prefill.chunk_gated_delta_rule
        return None

    def applies(self, cfg):
        if cfg.mode != "fwd":
            return "FlashInfer's GDN prefill has no backward"
        if (cfg.k_dim, cfg.v_dim) != (128, 128) or cfg.dtype == "fp32":
            return "FlashInfer's SM90 kernel takes K = V = 128 in bf16/fp16"
        if cfg.l2norm:
            return "FlashInfer's prefill takes normalised q, k (no in-kernel l2-norm)"
        return None

    def __call__(self, inp):
        x = _flashinfer_inputs(inp)
        o, state = self.fn(*x["qkv"], x["alpha"], x["beta"], scale=None, initial_state=x["h0"],
                           output_final_state=True, cu_seqlens=x["cu"], use_cp="auto")
        return o.view(inp.v.shape), state.transpose(-1, -2)


def _flashinfer_inputs(inp: InputSet) -> dict:
    """FlashInfer's forms of one input set, made on its first use and kept with it."""
    if not hasattr(inp, "_flashinfer"):
        B, T = inp.q.shape[:2]
        if inp.cu_seqlens is not None:
            cu = inp.cu_seqlens.to(torch.int32)
        else:
            cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=inp.q.device)
        packed = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (inp.q, inp.k, inp.v)]
        inp._flashinfer = {"qkv": packed, "alpha": inp.g.reshape(B * T, -1).float().exp().contiguous(),
                           "beta": inp.beta.reshape(B * T, -1).float().contiguous(), "cu": cu,
                           "h0": None if inp.h0 is None else inp.h0.transpose(-1, -2).contiguous()}
    return inp._flashinfer


class Naive(Impl):
    """flashdelta's float64 token-by-token loop: exact, slow, so only for configurations up to max_tokens."""

    name = "naive-fp64"
    timed = False

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def load(self, device):
        if self.max_tokens <= 0:
            return "disabled (--reference-max-tokens 0)"
        from flashdelta.gated_delta_rule.naive import naive_gated_delta_rule
        self.fn = naive_gated_delta_rule
        return None

    def applies(self, cfg):
        # Autograd through the token loop costs far more than the loop itself: a quarter of the tokens.
        limit = self.max_tokens if cfg.mode == "fwd" else self.max_tokens // 4
        if cfg.tokens > limit:
            return f"{cfg.tokens} tokens > {limit} (--reference-max-tokens, a quarter with the backward)"
        return None

    def __call__(self, inp):
        return self.fn(inp.q, inp.k, inp.v, inp.g, inp.beta, initial_state=inp.h0, output_final_state=True,
                       use_qk_l2norm_in_kernel=inp.l2norm, cu_seqlens=inp.cu_seqlens)

    description = "token loop, float64"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else ""
