"""Registers sparsec's device kernels behind its ops (:mod:`sparsec.ir.ops`,
:mod:`sparsec.ir.linear_ops`), whose own bodies are the pure-torch reference.

- CPU tensors: :mod:`sparsec.runtime.cpu_attention`: each chunk of queries reads only the
  keys its rows keep, where the reference computes every score and then masks.
- CUDA tensors: the Triton and FlashAttention-4 attention kernels
  (:mod:`sparsec.runtime.kernels`) and the sparse linear kernels
  (:mod:`sparsec.runtime.sparse_linear_gpu`), imported at their first call, so that
  ``import sparsec`` loads no Triton.

The ``sparsec`` package imports this module, so the kernels are in place whenever any part
of sparsec is.
"""
from __future__ import annotations

import torch

from sparsec.ir.ops import check_attention_inputs, check_causal_alignment
from sparsec.ir.plan import decoded_groups
from sparsec.runtime import cpu_attention


@torch.library.register_kernel("sparsec::sparse_attention", "cpu")
def _sparse_attention_cpu(q, k, v, mask, scale, causal, groups):
    check_attention_inputs(q, k, v)
    check_causal_alignment(q, k, causal)
    return cpu_attention.sparse_attention(q, k, v, mask, scale, causal, decoded_groups(groups))


@torch.library.register_kernel("sparsec::sparse_attention", "cuda")
def _sparse_attention_cuda(q, k, v, mask, scale, causal, groups):
    from sparsec.runtime import kernels

    check_attention_inputs(q, k, v)
    check_causal_alignment(q, k, causal)
    return kernels.sparse_attention(q, k, v, mask, scale, causal, groups)


_SPARSE_ATTENTION = {"cpu": _sparse_attention_cpu, "cuda": _sparse_attention_cuda}


def sparse_attention_direct(q, k, v, mask, scale, causal, groups):
    """``sparsec::sparse_attention`` without the dispatcher: the kernel registered above for
    the tensors' device (the op itself elsewhere)."""
    kernel = _SPARSE_ATTENTION.get(q.device.type)
    if kernel is None:
        return torch.ops.sparsec.sparse_attention.default(q, k, v, mask, scale, causal, groups)
    return kernel(q, k, v, mask, scale, causal, groups)


@torch.library.register_kernel("sparsec::sparse_linear", "cuda")
def _sparse_linear_cuda(x, values, mask, bias, layout):
    from sparsec.runtime import sparse_linear_gpu

    return sparse_linear_gpu.sparse_linear_cuda(x, values, mask, bias, layout)
