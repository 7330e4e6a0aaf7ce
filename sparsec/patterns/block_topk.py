"""Static block layout: the top-k (query block, key block) pairs found at calibration.

params: ``block`` (token size of the square blocks the layout was found at), ``grid``
(``[query blocks, key blocks]`` at the calibration length) and ``blocks`` (the kept
``[query_block, key_block]`` pairs on that grid).

At another length the layout is stretched: a block of the new grid is kept when its
relative position falls into a kept block of the calibration grid (nearest-grid mapping,
as resizing a layout image), and blocks that hold the diagonal are always kept, so no
query row is empty.
"""
from __future__ import annotations

import torch

from .base import Pattern, register


@register
class BlockTopk(Pattern):
    kind = "block_topk"

    def keep(self, params, d, rows, cols, n_q, n_k):
        block = int(params["block"])
        grid_q, grid_k = params["grid"]
        layout = torch.zeros(grid_q, grid_k, dtype=torch.bool)
        if params["blocks"]:
            qb, kb = torch.tensor(params["blocks"], dtype=torch.long).T
            layout[qb, kb] = True
        # Blocks of the length being served, then their position on the calibration grid.
        row_block = rows // block
        col_block = cols // block
        blocks_q = -(-n_q // block)
        blocks_k = -(-n_k // block)
        grid_row = torch.clamp(row_block * grid_q // blocks_q, max=grid_q - 1)
        grid_col = torch.clamp(col_block * grid_k // blocks_k, max=grid_k - 1)
        kept = layout.to(rows.device)[grid_row[:, None], grid_col[None, :]]
        # A block that holds the diagonal: its key block is the aligned query's key block.
        diagonal_block = (rows + (n_k - n_q)) // block
        return kept | (col_block[None, :] == diagonal_block[:, None])
