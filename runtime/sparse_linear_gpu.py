"""The CUDA kernel of ``sparsec::sparse_linear``; :mod:`sparsec.analysis.linear_costs` predicts
which kernel wins.

Per call, from the weight's structure and shape and the token count ``M``:

- ``2:4`` (and sparser ``1:4``) bf16/fp16 weights run as PyTorch semi-structured sparse
  tensors (``torch.sparse.to_sparse_semi_structured``, cuSPARSELt);
- ``blockB`` weights run the Triton block-sparse matmul
  (:mod:`sparsec.codegen.triton.block_sparse_matmul`);
- anything else, and any shape where the measured table below says the sparse kernel is
  not at least ``MIN_SPEEDUP`` times faster than cuBLAS, runs cuBLAS on the decompressed
  weight. ``SPARSEC_SPARSE_LINEAR=sparse|dense`` overrides the table.

Prepared operands (semi-structured tensor, block-CSR indices, dense weight) are built on
first use and cached per compressed ``values`` tensor, so a layer that falls back to dense
holds its dense weight on the GPU beside the compressed one.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from sparsec.ir import config
from sparsec.analysis.linear_costs import MIN_SPEEDUP, predicted_speedup, sparse_kernel
from sparsec.weights.storage import Layout, block_csr, decode_layout, decompress

def choose_kernel(layout: Layout, level: float, tokens: int, dtype: torch.dtype) -> str:
    """``semi_structured``, ``block_sparse`` or ``dense`` for one call."""
    kernel = sparse_kernel(layout)
    if kernel is None or dtype not in (torch.float16, torch.bfloat16):
        return "dense"
    mode = config.sparse_linear_kernel()
    if mode != "auto":
        return kernel if mode == "sparse" else "dense"
    speedup = predicted_speedup(layout, level, tokens)
    return kernel if speedup is not None and speedup >= MIN_SPEEDUP else "dense"


# -- cache of prepared operands, one entry per (values tensor, kernel, dtype) --
_prepared: dict[tuple, tuple[weakref.ref, int, object]] = {}


def _prepare(values: torch.Tensor, mask: torch.Tensor, layout: Layout, kernel: str, dtype: torch.dtype):
    key = (id(values), kernel, dtype)
    hit = _prepared.get(key)
    if hit is not None and hit[0]() is values and hit[1] == values._version:
        return hit[2]
    if kernel == "block_sparse":
        prepared = block_csr(mask, layout)
    else:
        weight = decompress(values, mask, layout).to(dtype)
        prepared = torch.sparse.to_sparse_semi_structured(weight) if kernel == "semi_structured" else weight
    _prepared[key] = (weakref.ref(values, lambda _, key=key: _prepared.pop(key, None)), values._version, prepared)
    return prepared


def sparse_linear_cuda(x, values, mask, bias, layout):
    parsed = decode_layout(layout)
    tokens = x.numel() // x.shape[-1]
    level = 1 - values.numel() / (parsed.out_features * parsed.in_features)
    kernel = choose_kernel(parsed, level, tokens, x.dtype)
    if kernel == "block_sparse" and values.dtype != x.dtype:   # the Triton kernel reads values as stored
        kernel = "dense"
    bias = None if bias is None else bias.to(x.dtype)
    if kernel == "block_sparse":
        from sparsec.codegen.triton.block_sparse_matmul import block_sparse_matmul

        crow, col = _prepare(values, mask, parsed, kernel, x.dtype)
        y = block_sparse_matmul(x.reshape(tokens, parsed.in_features), values, crow, col, bias,
                                parsed.block, parsed.out_features)
        return y.reshape(x.shape[:-1] + (parsed.out_features,))
    return F.linear(x, _prepare(values, mask, parsed, kernel, x.dtype), bias)
