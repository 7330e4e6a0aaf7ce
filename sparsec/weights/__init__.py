"""Weight sparsity building blocks: structures and masks, scores, OWL allocation, and
compressed storage. The pass that uses them is :mod:`sparsec.passes.sparsify_weights`."""
from .allocation import outlier_ratio, owl_levels, round_levels, uniform_levels
from .scores import COMPARISON_GROUP, score_weight
from .storage import Layout, block_csr, compress, decode_layout, decompress, storage_bytes
from .structures import Structure, parse_structure

__all__ = ["COMPARISON_GROUP", "Layout", "Structure", "block_csr", "compress", "decode_layout", "decompress",
           "outlier_ratio", "owl_levels", "parse_structure", "round_levels", "score_weight", "storage_bytes",
           "uniform_levels"]
