"""The pattern library: one module per family, each owning its mask, block layout, cost,
fit, canonical parameters and its piece of every backend (docs/pattern_families.md).

Importing this package registers every family, simplest first (the order classification
breaks ties in); look one up with :func:`get_pattern`.
"""
from sparsec.patterns.base import (Elastic, MaskOps, Pattern, TorchOps, backend_piece, canonical_params, get_pattern,
                   instance_key, offsets, pattern_kinds, register, register_piece, unregister)
from sparsec.patterns import (dense, window, sink_window, vertical_stripe, multi_diagonal, block_topk,  # noqa: F401
               vertical_slash, dynamic_blocks, skip)                                     # (registers them)

__all__ = ["Elastic", "MaskOps", "Pattern", "TorchOps", "backend_piece", "canonical_params", "get_pattern",
           "instance_key", "offsets", "pattern_kinds", "register", "register_piece", "unregister"]
