"""Per-layer sparsity levels for one global target.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity", arXiv:2310.05175): layers
with more outlier scores (entries above ``threshold`` times the layer's mean score) are
pruned less. The outlier ratios are rescaled to ``[0, 2*lam]`` and subtracted from the
target around their mean, so the levels spread by at most ``±lam``. Our mean is weighted
by parameter count, so the fraction of all weights pruned equals the target.
"""
from __future__ import annotations

import torch

from sparsec.weights.structures import Structure


def outlier_ratio(scores: torch.Tensor, threshold: float = 5.0) -> float:
    """Fraction of ``scores`` above ``threshold`` times their mean (OWL's layerwise outlier distribution)."""
    return float((scores > threshold * scores.mean()).float().mean())


def _weighted_mean(values: torch.Tensor, sizes: torch.Tensor) -> float:
    return float((values * sizes).sum() / sizes.sum())


def owl_levels(ratios: list[float], sizes: list[int], target: float, structure: Structure,
               lam: float = 0.08) -> list[float]:
    """Levels whose size-weighted mean is ``target`` (within rounding for N:M), lower where ``ratios`` are higher."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min() if len(ratios) else torch.tensor(0.0)
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    levels = target - (scaled - _weighted_mean(scaled, w))
    # Clipping to [0, max] moves the mean; shift back until it holds.
    for _ in range(50):
        levels = levels.clamp(0.0, structure.max_level)
        shift = target - _weighted_mean(levels, w)
        if abs(shift) < 1e-9:
            break
        levels = levels + shift
    levels = levels.clamp(0.0, structure.max_level).tolist()
    return round_levels(levels, sizes, target, structure) if structure.discrete else levels


def uniform_levels(count: int, target: float, structure: Structure) -> list[float]:
    return [structure.nearest_level(target)] * count


def round_levels(levels: list[float], sizes: list[int], target: float, structure: Structure) -> list[float]:
    """Snap continuous levels to the structure's allowed ones, keeping the pruned count near the target.

    Every level rounds down to an allowed one; then the layers furthest below their
    continuous level step up while that brings the total closer to the target.
    """
    allowed = sorted(structure.levels())
    floors = [max(a for a in allowed if a <= level + 1e-9) for level in levels]
    budget = target * sum(sizes)
    pruned = sum(f * s for f, s in zip(floors, sizes))
    order = sorted(range(len(levels)), key=lambda i: levels[i] - floors[i], reverse=True)
    for i in order:
        higher = [a for a in allowed if a > floors[i] + 1e-9]
        if not higher:
            continue
        step = (higher[0] - floors[i]) * sizes[i]
        if abs(pruned + step - budget) < abs(pruned - budget):
            floors[i], pruned = higher[0], pruned + step
    return floors
