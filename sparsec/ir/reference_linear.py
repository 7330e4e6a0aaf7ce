"""Pure-torch reference of ``sparsec::sparse_linear``: decompress the weight, then a
dense matmul. Every sparse kernel is tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.weights.storage import decode_layout, decompress


def sparse_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
                  layout: str) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` decompressed from ``(values, mask)`` (see sparsec.weights.storage)."""
    weight = decompress(values, mask, decode_layout(layout))
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
