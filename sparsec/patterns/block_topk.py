"""Static block layout: the top-k (query block, key block) pairs found at calibration.

params: ``block`` (token size of the square blocks the layout was found at), ``grid``
(``[query blocks, key blocks]`` at the calibration length) and ``blocks`` (the kept
``[query_block, key_block]`` pairs on that grid).

At another length the layout is stretched: a block of the new grid is kept when its
relative position falls into a kept block of the calibration grid (nearest-grid mapping,
as resizing a layout image), and blocks that hold the diagonal are always kept, so no
query row is empty.

The fit keeps the diagonal blocks and adds blocks by calibration mass, heaviest first,
until the recall is reached, on the profile's square ``block`` grid (the greatest common
divisor of the target's ``block_m`` and ``block_n``, so it tiles the kernels' blocks).
"""
from __future__ import annotations

import numpy as np
import sympy
import torch

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Pattern, full_pairs, register
from sparsec.patterns.shared import diagonal_blocks, tile_pairs


MIN_GRID = 4


@register
class BlockTopk(Pattern):
    kind = "block_topk"
    layout_from_calibration = True
    index_list_params = frozenset({"blocks"})
    # Lookup-table template, KEEP_KIND 1 with the calibration layout as the grid (keep_grid).
    triton_template = "lut"
    triton_flags = {"KEEP_KIND": 1, "HAS_COLUMNS": False}

    def merge(self, first, second):
        """Both layouts' blocks, when they share a block size and grid."""
        if (first["block"], first["grid"]) != (second["block"], second["grid"]):
            return None
        blocks = sorted({tuple(b) for b in first["blocks"]} | {tuple(b) for b in second["blocks"]})
        return {**first, "blocks": [list(b) for b in blocks]}

    def index_keep(self, params, i, j, d, ops):
        """The calibration layout stretched to this length (nearest grid cell), or the key
        block that holds the query's diagonal position ``i + (n_k - n_q) = d + j``."""
        block = int(params["block"])
        grid_q, grid_k = params["grid"]
        blocks_q, blocks_k = (ops.n_q + block - 1) // block, (ops.n_k + block - 1) // block
        grid_row = ops.minimum((i // block) * grid_q // blocks_q, grid_q - 1)
        grid_col = ops.minimum((j // block) * grid_k // blocks_k, grid_k - 1)
        kept = ops.lookup(_flat_layout(params), grid_row * grid_k + grid_col)
        return kept | ((j // block) == ((d + j) // block))

    def without_leading_keys(self, params, dropped, n_q, n_k):
        """The block grid starts at key 0: exact only when ``dropped`` is whole blocks. Then
        the layout stretched to ``(n_q, n_k)`` becomes a grid of this length's blocks (which
        no longer stretches) without its first ``dropped / block`` key blocks."""
        block = int(params["block"])
        if dropped % block:
            return None
        kept = self.stretched_layout(params, n_q, n_k)[:, dropped // block:]
        return self.kind, {"block": block, "grid": list(kept.shape), "blocks": kept.nonzero().tolist()}

    def layout(self, params) -> np.ndarray:
        """The kept blocks as a boolean ``[grid_q, grid_k]`` array (the calibration grid)."""
        return np.array(_flat_layout(params), dtype=bool).reshape(params["grid"])

    def keep_grid(self, params, n_q, n_k):
        return torch.from_numpy(self.layout(params)), int(params["block"])

    def split_initializer(self, params):
        """The layout travels as a boolean initializer, not inside the JSON attribute."""
        return {k: v for k, v in params.items() if k != "blocks"}, self.layout(params)

    def join_initializer(self, params, initializer):
        return {**params, "blocks": np.argwhere(initializer).tolist()}

    def describe(self, params):
        grid_q, grid_k = params["grid"]
        return f"block={params['block']}, {len(params['blocks'])} of {grid_q}x{grid_k} blocks"

    def stretched_layout(self, params, n_q, n_k) -> torch.Tensor:
        """Boolean ``[ceil(n_q/block), ceil(n_k/block)]``: the calibration layout stretched to
        the block grid of ``(n_q, n_k)`` (nearest grid cell), without the diagonal blocks."""
        block = int(params["block"])
        grid_q, grid_k = params["grid"]
        layout = torch.from_numpy(self.layout(params))
        blocks_q, blocks_k = -(-n_q // block), -(-n_k // block)
        grid_row = torch.clamp(torch.arange(blocks_q) * grid_q // blocks_q, max=grid_q - 1)
        grid_col = torch.clamp(torch.arange(blocks_k) * grid_k // blocks_k, max=grid_k - 1)
        return layout[grid_row[:, None], grid_col[None, :]]

    def grid_layout(self, params, n_q, n_k) -> torch.Tensor:
        """Boolean ``[ceil(n_q/block), ceil(n_k/block)]``: the ``block`` x ``block`` tiles
        holding kept pairs at ``(n_q, n_k)`` (before the causal cut)."""
        block = int(params["block"])
        return self.stretched_layout(params, n_q, n_k) | diagonal_blocks(n_q, n_k, block)

    def costly_pair_mask(self, params, block_m, block_n):
        """A layout cell per pair, unless its cells are whole tiles (then with the diagonal
        cells too, at an offset ``n_k - n_q`` on the cell grid, as in prefill)."""
        block = int(params["block"])
        return block % block_m != 0 or block % block_n != 0

    def chunk_padding(self, params, n, causal, rows):
        """Rows keep different key blocks (the layout is where calibration mass was): each
        chunk's union of its layout rows' kept blocks, over the rows' own."""
        block = int(params["block"])
        kept = self.grid_layout(params, n, n)
        if causal:
            kept &= torch.ones_like(kept).tril()
        work = 0
        for start in range(0, n, rows):
            end = min(start + rows, n)
            union = kept[start // block:(end - 1) // block + 1].any(0)     # the chunk's layout rows
            work += (end - start) * int(union.sum())
        return work / max(block * float(kept.sum()), 1.0)

    def pairs(self, params, n, causal):
        """Exact: at ``n_q = n_k`` the kept set is whole tiles (diagonal ones included), each
        counted with the causal cut from prefix counts of the lower triangle."""
        block = int(params["block"])
        kept = self.stretched_layout(params, n, n)
        kept |= torch.eye(*kept.shape, dtype=torch.bool)
        return int(tile_pairs(n, block, causal)[kept].sum())

    def pairs_expr(self, params, causal):
        """Approximate: the diagonal blocks grow linearly with ``N``, the stretched layout
        covers the fraction of the score matrix it covers at the calibration grid's length."""
        n = int(params["grid"][1]) * int(params["block"])
        diagonal = self.pairs({**params, "blocks": []}, n, causal)
        stretched = sympy.Integer(self.pairs(params, n, causal) - diagonal) / full_pairs(sympy.Integer(n), causal)
        return sympy.Rational(diagonal, n) * N + stretched * full_pairs(N, causal)

    def recall(self, profile, params):
        """Exact when ``n_k - n_q`` is a multiple of ``block`` (as in self-attention);
        otherwise the blocks the diagonal crosses are counted whole."""
        block = int(params["block"])
        return float(profile.pooled(block, block)[self.grid_layout(params, profile.n_q, profile.n_k)].sum())

    def fit(self, profiles, recall):
        """Fitted on the longest length; other lengths see the stretched layout.

        A grid of fewer than ``MIN_GRID`` blocks a side is not fitted (recall 0): there the
        always-kept diagonal blocks cover nearly everything, so a layout would look exact
        at calibration yet say nothing about longer sequences."""
        longest = profiles[-1]
        mass = longest.block_mass
        params = {"block": longest.block, "grid": list(mass.shape), "blocks": []}
        if min(mass.shape) < MIN_GRID:
            return params, 0.0
        forced = self.grid_layout(params, longest.n_q, longest.n_k)
        rest = torch.where(forced, 0.0, mass).flatten()
        order = rest.argsort(descending=True)[: int((rest > 0).sum())]
        reached = torch.cat([mass[forced].sum()[None], mass[forced].sum() + rest[order].cumsum(0)])
        count = fitting.smallest_meeting(reached, recall, start=0)
        params["blocks"] = sorted(list(divmod(int(i), mass.shape[1])) for i in order[:count])
        return params, fitting.worst_recall(self, profiles, params)


def _flat_layout(params) -> list[bool]:
    """The kept blocks, row-major over the calibration grid, as a plain list (not numpy's:
    FlexAttention traces the mask that reads it with dynamo)."""
    grid_q, grid_k = params["grid"]
    layout = [False] * (grid_q * grid_k)
    for query_block, key_block in params["blocks"]:
        layout[query_block * grid_k + key_block] = True
    return layout
