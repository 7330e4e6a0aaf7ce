"""``torch.ops.sparsec.sparse_linear(x, values, mask, bias, layout)``: a linear layer whose
weight is stored compressed (kept ``values`` + packed bit ``mask``, see
:mod:`sparsec.weights.storage`); ``layout`` is the JSON :class:`~sparsec.weights.Layout`
(structure, out_features, in_features). Because the graph holds only the compressed
tensors, a saved program is smaller than the dense one.

The default kernel is the reference: decompress, then a dense matmul. The CUDA kernel
(:mod:`sparsec.runtime.sparse_linear_gpu`, registered by :mod:`sparsec.runtime.device_kernels`)
runs 2:4 weights on sparse tensor cores and block weights with a Triton block-sparse matmul
where that beats cuBLAS.
"""
from __future__ import annotations

from typing import Optional

import torch

from sparsec.ir import reference_linear
from sparsec.weights.storage import decode_layout


@torch.library.custom_op("sparsec::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
                  layout: str) -> torch.Tensor:
    return reference_linear.sparse_linear(x, values, mask, bias, layout)


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, mask, bias, layout):
    return x.new_empty(x.shape[:-1] + (decode_layout(layout).out_features,))
