"""The report's images, drawn with matplotlib (Agg) and returned as base64 PNG data URIs.

Head heatmaps are painted pixel by pixel (colour map + outline) instead of as one
matplotlib figure per head: a 32-layer, 32-head model has 1,024 of them, and a figure each
would take tens of seconds. Figures are drawn on an Agg canvas without pyplot, so making a
report neither needs a display nor changes the backend of a user's notebook.
"""
from __future__ import annotations

import base64
import io
import math

import matplotlib
import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HEATMAP_PIXELS = 112          # a head's heatmap is about this many pixels on a side
MAX_CELLS = 128               # longer block grids are pooled down to this many cells a side
OUTLINE_RGB = (1.0, 0.2, 0.2)  # red reads well on viridis
LOG_FLOOR = 1e-6              # mass below this fraction of the head's maximum: darkest colour


def png_data_uri(rgb: np.ndarray) -> str:
    """An ``[H, W, 3]`` float image in [0, 1] as a ``data:image/png;base64,`` URI."""
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.clip(rgb, 0.0, 1.0), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pool(grid: np.ndarray, factor: int, reduce) -> np.ndarray:
    """Reduce a 2-D grid over ``factor`` x ``factor`` tiles (the edge tiles may be partial)."""
    if factor == 1:
        return grid
    rows, cols = math.ceil(grid.shape[0] / factor), math.ceil(grid.shape[1] / factor)
    padded = np.zeros((rows * factor, cols * factor), dtype=grid.dtype)
    padded[: grid.shape[0], : grid.shape[1]] = grid
    return reduce(padded.reshape(rows, factor, cols, factor), axis=(1, 3))


def _outline(kept: np.ndarray) -> np.ndarray:
    """Pixels of ``kept`` with a 4-neighbour outside it (the image edge counts as outside)."""
    padded = np.pad(kept, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return kept & ~inner


def head_heatmap(mass: "torch.Tensor | None", layout: torch.Tensor) -> str:
    """One head's block-pooled attention mass (log colour scale) with the blocks its pattern
    computes outlined. ``mass`` ``[nbq, nbk]`` (None: draw the layout alone), ``layout`` a
    boolean grid of the same shape."""
    kept = layout.cpu().numpy().astype(bool)
    factor = max(1, math.ceil(max(kept.shape) / MAX_CELLS))
    kept = _pool(kept, factor, np.any)
    if mass is None:
        rgb = np.where(kept[..., None], 0.85, 0.35) * np.ones(3)
    else:
        grid = _pool(mass.detach().float().cpu().numpy(), factor, np.sum)
        logged = np.log10(np.maximum(grid / max(grid.max(), 1e-30), LOG_FLOOR))
        shade = 1.0 + logged / -math.log10(LOG_FLOOR)  # 0 at the floor, 1 at the head's maximum
        rgb = matplotlib.colormaps["viridis"](shade)[..., :3]
        rgb[grid <= 0] = 0.93   # no attention at all (e.g. above the causal diagonal): light grey
    scale = max(1, HEATMAP_PIXELS // max(kept.shape))
    rgb = np.kron(rgb, np.ones((scale, scale, 1)))
    kept = np.kron(kept, np.ones((scale, scale), dtype=bool))
    rgb[_outline(kept)] = OUTLINE_RGB
    return png_data_uri(rgb)


def sensitivity_plot(curves: list[tuple[list, list]], chosen: tuple[float, float] | None,
                     xlabel: str, ylabel: str) -> str:
    """A layer's sensitivity curves (one per head, or one for the layer), the chosen point marked."""
    figure = Figure(figsize=(3.4, 2.2), dpi=100, layout="tight")
    axes = figure.subplots()
    for xs, ys in curves:
        axes.plot(xs, ys, marker="o", markersize=3, color="#1f77b4", alpha=1.0 if len(curves) == 1 else 0.5)
    if chosen is not None:
        axes.axvline(chosen[0], color="#d62728", linestyle="--", linewidth=1)
        axes.plot(*chosen, marker="o", markersize=6, color="#d62728", label="chosen")
        axes.legend(fontsize=7, loc="upper left")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    return _figure_data_uri(figure)
