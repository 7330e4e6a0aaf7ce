"""Pieces several families share: the window band and the pair-count formulas, the tiles a
block grid's diagonal crosses and their pair counts, and a dynamic family's estimating
probabilities.

One formula serves numbers and sympy: the ``lo`` / ``hi`` arguments are ``min`` / ``max`` for
numbers and ``sympy.Min`` / ``sympy.Max`` (:data:`SYMBOLIC`) for a cost in ``N``.
"""
from __future__ import annotations

import sympy
import torch

from sparsec.patterns.base import MASKED_ADDITIVE, Elastic, offsets


def band(d, width, ops):
    """Offsets within ``width`` of the diagonal: causal heads keep ``0 <= d < width`` (the
    causal cut removes ``d < 0``), non-causal heads the symmetric band ``|d| < width``."""
    return ops.abs(d) < width


def is_fixed(size) -> bool:
    """Whether an elastic size does not grow with the length."""
    return Elastic.from_json(size).b == 0


def size_at(params: dict, name: str, n: int) -> int:
    """The elastic size ``params[name]`` in tokens at ``N = n``."""
    return Elastic.from_json(params[name]).at(n)


def window_pairs(n, w, causal, lo=min):
    """Pairs with ``|d| < w`` at ``n_q = n_k = n``."""
    w = lo(w, n)
    return w * n - w * (w - 1) / 2 if causal else n * (2 * w - 1) - w * (w - 1)


def column_pairs(n, column, w, causal, lo=min, hi=max):
    """Pairs of key ``column`` (< n) outside the window ``|d| < w``."""
    w = lo(w, n)
    rows_after = hi(0, n - w - column)                 # d >= w
    return rows_after if causal else rows_after + hi(0, column - w + 1)   # and d <= -w


def sink_pairs(n, sink, w, causal, lo=min, hi=max):
    """Pairs of the first ``sink`` key columns outside the window (``column_pairs`` summed)."""
    w, sink = lo(w, n), lo(sink, n)
    after = lo(sink, n - w)
    pairs = after * (n - w) - after * (after - 1) / 2
    before = hi(0, sink - w)
    return pairs if causal else pairs + before * (before + 1) / 2


SYMBOLIC = {"lo": sympy.Min, "hi": sympy.Max}


def diagonal_blocks(n_q: int, n_k: int, block: int, device=None) -> torch.Tensor:
    """Boolean ``[ceil(n_q/block), ceil(n_k/block)]``: the key blocks each query block's rows
    reach the diagonal in (a query block's rows sit at key positions ``p0 .. p1``)."""
    first = torch.arange(-(-n_q // block), device=device) * block
    last = torch.clamp(first + block, max=n_q) - 1
    lo, hi = (first + n_k - n_q) // block, (last + n_k - n_q) // block
    key_block = torch.arange(-(-n_k // block), device=device)
    return (key_block[None, :] >= lo[:, None]) & (key_block[None, :] <= hi[:, None])


def tile_pairs(n: int, block: int, causal: bool) -> torch.Tensor:
    """``[ceil(n/block)] * 2``: pairs of each ``block`` x ``block`` tile at ``n_q = n_k = n``,
    with the causal cut (from prefix counts of the lower triangle)."""
    edges = torch.clamp(torch.arange(-(-n // block) + 1) * block, max=n)
    if not causal:
        sizes = edges[1:] - edges[:-1]
        return sizes[:, None] * sizes[None, :]
    # lower[r, c]: pairs (i, j) with i < r, j < c, j <= i.
    r, c = edges[:, None], edges[None, :]
    lower = torch.where(r <= c, r * (r + 1) // 2, c * (c + 1) // 2 + (r - c) * c)
    return lower[1:, 1:] - lower[:-1, 1:] - lower[1:, :-1] + lower[:-1, :-1]


def estimating_probs(q_rows: torch.Tensor, rows: torch.Tensor, n_q: int, k: torch.Tensor, scale: float,
                     causal: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(probs, allowed)``: the softmax ``[B, H, L, n_k]`` of the estimating queries
    ``q_rows`` (at positions ``rows`` of ``n_q``) over every key, fp32, with the causal cut and
    ``mask`` (their rows of the site's user mask, boolean or additive): what attention will
    compute, so keys the mask removes get no mass (a fully masked row: none). ``allowed`` is
    the boolean of the keys the mask and the cut leave (None without a mask)."""
    n_k = k.shape[-2]
    d = offsets(rows, torch.arange(n_k, device=q_rows.device), n_q, n_k)
    scores = (q_rows.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(d < 0, float("-inf"))
    allowed = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            scores = scores + mask.float()
            allowed = mask > MASKED_ADDITIVE
        allowed = (allowed & (d >= 0) if causal else allowed).expand_as(scores)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0), allowed
