"""Sparsity structures of a linear's weight ``W`` (``[out_features, in_features]``) and
the keep-masks they allow.

- ``unstructured``: any entry may be pruned.
- ``N:M`` (``2:4``, ``4:8``): at most ``N`` of every ``M`` consecutive inputs of a row are
  kept. ``2:4`` is what sparse tensor cores run (cuSPARSELt / CUTLASS); sparser levels
  (``1:4``) are still valid ``2:4`` operands.
- ``blockB`` (``block32``, ``block64``): whole ``B x B`` tiles are kept or pruned, the
  operand of a block-sparse matmul.

A *level* is the fraction of weights pruned. Scores are compared within a *group*:
``"row"`` ranks the entries (or block rows) of each output row separately, as Wanda does
(Sun et al., 2023, arXiv:2306.11695); ``"layer"`` ranks the whole matrix at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

UNSTRUCTURED_LEVELS = tuple(i / 8 for i in range(8))   # 0, 0.125, ..., 0.875
MAX_CONTINUOUS_LEVEL = 0.95


@dataclass(frozen=True)
class Structure:
    kind: str          # "unstructured", "n:m" or "block"
    n: int = 0         # N of N:M (most kept per group)
    m: int = 0         # M of N:M (group size)
    block: int = 0     # tile side of blockB

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block}"
        return "unstructured"

    @property
    def discrete(self) -> bool:
        """N:M levels are multiples of ``1/M``; other structures take any level."""
        return self.kind == "n:m"

    @property
    def max_level(self) -> float:
        return 1 - 1 / self.m if self.kind == "n:m" else MAX_CONTINUOUS_LEVEL

    def levels(self) -> list[float]:
        """Candidate levels a search may choose from (0 = dense)."""
        if self.kind == "n:m":
            return [0.0] + [1 - kept / self.m for kept in range(self.n, 0, -1)]
        return list(UNSTRUCTURED_LEVELS)

    def misfit(self, out_features: int, in_features: int) -> str | None:
        """Why a weight of this shape cannot take the structure, or None."""
        if self.kind == "n:m" and in_features % self.m:
            return f"in_features {in_features} is not a multiple of {self.m}"
        if self.kind == "block" and (out_features % self.block or in_features % self.block):
            return f"shape {out_features}x{in_features} is not a multiple of the {self.block}x{self.block} block"
        return None

    def nearest_level(self, level: float) -> float:
        """The realisable level closest to ``level`` (N:M levels are multiples of 1/M)."""
        if self.kind != "n:m":
            return min(max(level, 0.0), self.max_level)
        return min(self.levels(), key=lambda allowed: abs(allowed - level))

    def mask(self, scores: torch.Tensor, level: float, group: str = "row") -> torch.Tensor:
        """Keep-mask (True = kept) pruning a fraction ``level`` of ``scores``' lowest entries.

        N:M prunes per group of ``M``, so ``group`` only matters for unstructured and block.
        """
        out_features, in_features = scores.shape
        if level <= 0:
            return torch.ones_like(scores, dtype=torch.bool)
        if self.kind == "n:m":
            kept = round((1 - level) * self.m)
            if kept > self.n:
                raise ValueError(f"level {level} keeps {kept} of {self.m}, more than {self} allows")
            groups = scores.reshape(out_features, in_features // self.m, self.m)
            return _top_mask(groups, kept).reshape(out_features, in_features)
        if self.kind == "block":
            b = self.block
            tiles = scores.reshape(out_features // b, b, in_features // b, b).sum(dim=(1, 3))
            keep = _prune_lowest(tiles, level, group)
            return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
        return _prune_lowest(scores, level, group)


def _top_mask(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Along the last dimension, True at the ``kept`` highest scores."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if kept > 0:
        keep.scatter_(-1, scores.topk(kept, dim=-1).indices, True)
    return keep


def _prune_lowest(scores: torch.Tensor, level: float, group: str) -> torch.Tensor:
    if group == "row":
        return _top_mask(scores, scores.shape[1] - round(level * scores.shape[1]))
    flat = scores.reshape(1, -1)
    return _top_mask(flat, flat.shape[1] - round(level * flat.shape[1])).reshape(scores.shape)


@lru_cache(maxsize=64)
def parse_structure(text: "str | Structure") -> Structure:
    """``"unstructured"``, ``"2:4"``, ``"4:8"`` (any ``N:M``), ``"block32"``, ``"block64"``."""
    if isinstance(text, Structure):
        return text
    spec = text.strip().lower()
    if spec == "unstructured":
        return Structure("unstructured")
    if match := re.fullmatch(r"(\d+):(\d+)", spec):
        n, m = int(match[1]), int(match[2])
        if 0 < n < m:
            return Structure("n:m", n=n, m=m)
    if match := re.fullmatch(r"block(\d+)", spec):
        if int(match[1]) > 0:
            return Structure("block", block=int(match[1]))
    raise ValueError(f"unknown weight structure {text!r}; use 'unstructured', 'N:M' such as '2:4' "
                     "or '4:8', or 'blockB' such as 'block32' or 'block64'")
