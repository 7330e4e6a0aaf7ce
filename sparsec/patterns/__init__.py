"""The pattern library: each family's reference mask, block layout, density and fit.

Importing this package registers every family; look one up with :func:`get_pattern`.
"""
from .base import Elastic, Pattern, canonical_params, get_pattern, instance_key, offsets, pattern_kinds, register
from . import static, block_topk, vertical_slash  # noqa: F401  (registers the families)

__all__ = ["Elastic", "Pattern", "canonical_params", "get_pattern", "instance_key", "offsets", "pattern_kinds", "register"]
