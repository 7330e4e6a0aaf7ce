"""Pieces several static families share: the window band and the pair-count formulas.

One formula serves numbers and sympy: the ``lo`` / ``hi`` arguments are ``min`` / ``max`` for
numbers and ``sympy.Min`` / ``sympy.Max`` (:data:`SYMBOLIC`) for a cost in ``N``.
"""
from __future__ import annotations

import sympy

from sparsec.patterns.base import Elastic


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
