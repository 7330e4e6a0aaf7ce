"""Static pattern families whose mask is index arithmetic on (query, key) positions.

References: sliding window (Longformer), sink + window "A-shape" / streaming heads
(StreamingLLM), vertical stripes / global tokens (BigBird, MInference), periodic
diagonals of video DiTs (Sparse-vDiT, Sparse VideoGen).
"""
from __future__ import annotations

import torch

from .base import Elastic, Pattern, register


def _window(d: torch.Tensor, width: int) -> torch.Tensor:
    # Causal heads keep 0 <= d < width (the causal cut removes d < 0); non-causal heads
    # keep the symmetric band |d| < width.
    return d.abs() < width


@register
class Dense(Pattern):
    kind = "dense"

    def keep(self, params, d, rows, cols, n_q, n_k):
        return torch.ones_like(d, dtype=torch.bool)


@register
class Skip(Pattern):
    """The head is not computed: its output is zero."""

    kind = "skip"

    def keep(self, params, d, rows, cols, n_q, n_k):
        return torch.zeros_like(d, dtype=torch.bool)


@register
class Window(Pattern):
    """params: ``window`` (Elastic) — keys within ``window`` positions of the diagonal."""

    kind = "window"

    def keep(self, params, d, rows, cols, n_q, n_k):
        return _window(d, Elastic.from_json(params["window"]).at(n_k))


@register
class SinkWindow(Pattern):
    """params: ``sink`` (Elastic, first keys every query sees) and ``window`` (Elastic)."""

    kind = "sink_window"

    def keep(self, params, d, rows, cols, n_q, n_k):
        sink = Elastic.from_json(params["sink"]).at(n_k)
        return (cols[None, :] < sink) | _window(d, Elastic.from_json(params["window"]).at(n_k))


@register
class VerticalStripe(Pattern):
    """params: ``columns`` (absolute key positions every query sees; those past the
    sequence end are dropped) and ``window`` (Elastic, a local band that keeps the diagonal)."""

    kind = "vertical_stripe"

    def keep(self, params, d, rows, cols, n_q, n_k):
        columns = torch.tensor([c for c in params["columns"] if c < n_k], dtype=torch.long)
        stripe = torch.isin(cols, columns.to(cols.device))
        return stripe[None, :] | _window(d, Elastic.from_json(params["window"]).at(n_k))


@register
class MultiDiagonal(Pattern):
    """params: ``period`` (Elastic, tokens between diagonals, e.g. tokens per video frame),
    ``width`` (Elastic, half-width of each diagonal band) and ``count`` (how many diagonals
    on each side of the main one, main included; 0 means all)."""

    kind = "multi_diagonal"

    def keep(self, params, d, rows, cols, n_q, n_k):
        period = Elastic.from_json(params["period"]).at(n_k)
        width = Elastic.from_json(params["width"]).at(n_k)
        nearest = torch.round(d.double() / period).long()     # index m of the closest diagonal
        near = (d - nearest * period).abs() < width
        count = int(params.get("count", 0))
        if count > 0:
            near &= nearest.abs() < count
        return near
