"""Block-sparse matmul: ``Y = X @ W^T (+ bias)`` where ``W`` (``[N, K]``) is stored in
block-CSR with square ``BLOCK x BLOCK`` tiles.

``X`` is ``[M, K]`` row-major; ``values`` is ``[nnz_blocks, BLOCK, BLOCK]`` (each kept tile
of ``W``, row-major, tiles in row-major order); ``crow`` (``[N/BLOCK + 1]``) and ``col``
(``[nnz_blocks]``) are the int32 block-CSR indices. One program computes a
``BLOCK_M x BLOCK`` tile of ``Y`` (one block row of ``W``) by walking only the kept tiles of
that block row, so time and weight traffic scale with the density.

With few tokens the grid has one program per block row, too few to fill the GPU; then
``SPLIT`` programs share a block row, each taking every ``SPLIT``-th kept tile, and add
their partial sums atomically into a float32 output (split-K).

:func:`reference_block_sparse_matmul` is the torch reference beside it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsec.ir import config


# M_BUCKET (the next power of 2 of M) is not read: it keys the autotuner, so a new token
# count re-tunes only when it crosses a power of 2.
@triton.jit
def _block_sparse_matmul_kernel(X, VALUES, CROW, COL, BIAS, Y,
                                M, N, stride_xm, stride_ym, M_BUCKET,
                                BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
                                HAS_BIAS: tl.constexpr):
    block_row = tl.program_id(0)
    m_tile = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK)
    row_mask = offs_m[:, None] < M
    start = tl.load(CROW + block_row)
    end = tl.load(CROW + block_row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    # -- loop over the kept tiles of this block row --
    for index in range(start + split, end, SPLIT):
        col = tl.load(COL + index)
        x = tl.load(X + offs_m[:, None] * stride_xm + (col * BLOCK + offs_b)[None, :], mask=row_mask, other=0.0)
        w = tl.load(VALUES + index * BLOCK * BLOCK + offs_b[:, None] * BLOCK + offs_b[None, :])
        acc += tl.dot(x, tl.trans(w))
    # epilogue
    offs_n = block_row * BLOCK + offs_b
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n).to(tl.float32)
        acc += tl.where(split == 0, 1.0, 0.0) * bias[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=row_mask)


def _prune_configs(configs, named_args, **kwargs):
    # A tile taller than the token count only multiplies padding.
    tall = max(16, triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= tall] or configs[:1]


_block_sparse_matmul_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
             for bm, w, s in ((16, 4, 4), (32, 4, 4), (64, 4, 3), (64, 8, 4), (128, 4, 3), (128, 8, 3),
                              (128, 8, 4), (256, 8, 3))],
    key=["M_BUCKET", "N", "BLOCK"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_matmul_kernel)

SMALL_M = 16   # at or below: one BLOCK_M=16 tile of tokens, split-K across programs


def block_sparse_matmul(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                        bias: torch.Tensor | None, block: int, out_features: int) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias) -> [M, out_features]`` for block-CSR ``W``; see the module docstring."""
    m = x.shape[0]
    x = x.contiguous()
    has_bias = bias is not None
    bias_arg = bias if has_bias else x   # never read when HAS_BIAS is False
    block_rows = out_features // block
    if m <= SMALL_M:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split = max(1, min(8, (2 * sms) // block_rows))
        y = torch.zeros(m, out_features, dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
        _block_sparse_matmul_kernel[(block_rows, 1, split)](
            x, values, crow, col, bias_arg, y, m, out_features, x.stride(0), y.stride(0), 16,
            BLOCK=block, BLOCK_M=16, SPLIT=split, HAS_BIAS=has_bias, num_warps=4, num_stages=3)
        return y.to(x.dtype)
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    if config.triton_interpret():   # the CPU interpreter cannot time configs: take one
        _block_sparse_matmul_kernel[(block_rows, triton.cdiv(m, 32), 1)](
            x, values, crow, col, bias_arg, y, m, out_features, x.stride(0), y.stride(0), 0,
            BLOCK=block, BLOCK_M=32, SPLIT=1, HAS_BIAS=has_bias)
        return y
    grid = lambda meta: (block_rows, triton.cdiv(m, meta["BLOCK_M"]), 1)  # noqa: E731
    _block_sparse_matmul_tuned[grid](
        x, values, crow, col, bias_arg, y, m, out_features, x.stride(0), y.stride(0), triton.next_power_of_2(m),
        BLOCK=block, SPLIT=1, HAS_BIAS=has_bias)
    return y


def reference_block_sparse_matmul(x, values, crow, col, bias, block: int, out_features: int) -> torch.Tensor:
    """The same product from the dense weight, in float32."""
    in_features = x.shape[1]
    weight = torch.zeros(out_features, in_features, dtype=torch.float32, device=x.device)
    for row in range(out_features // block):
        for index in range(int(crow[row]), int(crow[row + 1])):
            c = int(col[index])
            weight[row * block:(row + 1) * block, c * block:(c + 1) * block] = values[index].float()
    y = x.float() @ weight.T
    return y if bias is None else y + bias.float()
