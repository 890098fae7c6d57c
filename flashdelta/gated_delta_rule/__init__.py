"""Gated delta rule (Gated DeltaNet): public op, exact references, context-parallel math."""
from .api import chunk_gated_delta_rule, explain
from .checkpoints import checkpoint_offsets
from .distributed import CPContext
from .naive import naive_gated_delta_rule
from .recurrent import fused_recurrent_gated_delta_rule

__all__ = ["CPContext", "checkpoint_offsets", "chunk_gated_delta_rule", "explain", "fused_recurrent_gated_delta_rule", "naive_gated_delta_rule"]
