"""Weight sparsity building blocks: structures and masks, scores, OWL allocation, and
compressed storage. The pass that uses them is :mod:`sparsec.passes.sparsify_weights`."""
from sparsec.weights.allocation import outlier_ratio, owl_levels, round_levels, uniform_levels
from sparsec.weights.scores import COMPARISON_GROUP, score_weight
from sparsec.weights.storage import Layout, block_csr, compress, decode_layout, decompress, storage_bytes
from sparsec.weights.structures import Structure, parse_structure

__all__ = ["COMPARISON_GROUP", "Layout", "Structure", "block_csr", "compress", "decode_layout", "decompress",
           "outlier_ratio", "owl_levels", "parse_structure", "round_levels", "score_weight", "storage_bytes",
           "uniform_levels"]
