"""flashdelta: gated delta-rule linear attention (Gated DeltaNet) with TileLang kernels for Hopper.

Importing flashdelta touches neither CUDA nor TileLang; both load on the first call that needs them.
"""
from .gated_delta_rule import (CPContext, checkpoint_offsets, chunk_gated_delta_rule, explain,
                               fused_recurrent_gated_delta_rule, naive_gated_delta_rule)

__version__ = "0.1.0"
__all__ = ["CPContext", "checkpoint_offsets", "chunk_gated_delta_rule", "explain", "fused_recurrent_gated_delta_rule", "naive_gated_delta_rule",
           "__version__"]
