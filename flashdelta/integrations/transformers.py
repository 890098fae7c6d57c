"""Hugging Face transformers: make every gated-delta layer of a model run flashdelta.

    import flashdelta.integrations.transformers as fd_hf
    fd_hf.enable(model)            # or fd_hf.enable() for every model family that has such layers
    ...
    fd_hf.disable()                # back to what transformers chose

transformers' GDN families (qwen3_next, qwen3_5, qwen3_5_moe, olmo_hybrid, ...) call two functions of
their modeling module, ``torch_chunk_gated_delta_rule`` (prefill, training) and
``torch_recurrent_gated_delta_rule`` (decode steps), which it binds at import to FLA's kernels
where FLA is installed and to a PyTorch fallback otherwise. ``enable`` rebinds both names in the
modeling modules to flashdelta's ops (kernels on Hopper, the exact PyTorch path elsewhere, CPU
included), so every model of such a family uses flashdelta, whatever it was loaded with.
Packed sequences (``cu_seq_lens_q``) work, which the PyTorch fallback refuses.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from ..gated_delta_rule.api import chunk_gated_delta_rule
from ..gated_delta_rule.recurrent import fused_recurrent_gated_delta_rule

CHUNK_NAME = "torch_chunk_gated_delta_rule"
RECURRENT_NAME = "torch_recurrent_gated_delta_rule"

_originals: dict[str, dict[str, object]] = {}      # module name -> the functions enable() replaced


def chunk(query, key, value, g, beta, chunk_size=64, initial_state=None, output_final_state=False,
          use_qk_l2norm_in_kernel=False, **kwargs):
    """``torch_chunk_gated_delta_rule``'s signature (``chunk_size`` fifth) on flashdelta's chunked op."""
    return chunk_gated_delta_rule(query, key, value, g, beta, initial_state=initial_state,
                                  output_final_state=output_final_state,
                                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, chunk_size=chunk_size, **kwargs)


def recurrent(query, key, value, g, beta, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, **kwargs):
    """``torch_recurrent_gated_delta_rule``'s signature on flashdelta's recurrent entry point."""
    return fused_recurrent_gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=initial_state,
                                            output_final_state=output_final_state,
                                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)


def gdn_modules() -> list[str]:
    """The installed transformers' modeling modules that define the two functions (read, not imported)."""
    import transformers.models as models
    found = []
    for info in pkgutil.iter_modules(models.__path__):
        if not info.ispkg:
            continue
        for path in sorted(Path(models.__path__[0], info.name).glob("modeling_*.py")):
            if f"def {CHUNK_NAME}(" in path.read_text(encoding="utf-8", errors="ignore"):
                found.append(f"{models.__name__}.{info.name}.{path.stem}")
    return found


def enable(model=None) -> list[str]:
    """Route the GDN layers to flashdelta: those of ``model``'s families, or of every family found.
    Returns the modeling modules changed. Idempotent; ``disable`` undoes it."""
    if model is None:
        names = gdn_modules()
    else:
        names = sorted({type(m).__module__ for m in model.modules()
                        if hasattr(sys.modules.get(type(m).__module__), CHUNK_NAME)})
        if not names:
            raise ValueError(f"{type(model).__name__}: no gated-delta layers found (no module of its layers "
                             f"defines {CHUNK_NAME})")
    for name in names:
        module = importlib.import_module(name)
        if name not in _originals:
            _originals[name] = {attr: getattr(module, attr) for attr in (CHUNK_NAME, RECURRENT_NAME)
                                if hasattr(module, attr)}
        setattr(module, CHUNK_NAME, chunk)
        if hasattr(module, RECURRENT_NAME):
            setattr(module, RECURRENT_NAME, recurrent)
    return names


def disable() -> None:
    """Give every module ``enable`` changed its own functions back."""
    for name, functions in _originals.items():
        for attr, fn in functions.items():
            setattr(sys.modules[name], attr, fn)
    _originals.clear()
