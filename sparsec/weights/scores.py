"""Importance scores of weight entries; the lowest are pruned.

- ``magnitude``: ``|W|``, ranked over the whole layer.
- ``wanda``: ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature over
  the calibration tokens, ranked per output row (Sun et al., 2023, arXiv:2306.11695).
"""
from __future__ import annotations

import torch

# Which entries a score method ranks against each other (see Structure.mask).
COMPARISON_GROUP = {"magnitude": "layer", "wanda": "row"}


def score_weight(weight: torch.Tensor, method: str, input_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 scores shaped like ``weight``; ``input_sq_norm`` is ``sum_t X[t, j]^2`` per input feature."""
    magnitude = weight.detach().float().abs()
    if method == "magnitude":
        return magnitude
    if method == "wanda":
        if input_sq_norm is None:
            raise ValueError("the wanda score needs calibration activations; pass calibration inputs "
                             "or use weight_score='magnitude'")
        return magnitude * input_sq_norm.float().sqrt().to(magnitude.device)[None, :]
    raise ValueError(f"unknown weight score {method!r}; use 'wanda' or 'magnitude'")
