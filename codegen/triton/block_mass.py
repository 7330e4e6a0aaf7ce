"""Row block mass: for a dynamic family's estimating queries, the softmax mass each one gives
every key block, in one kernel.

``dynamic_blocks`` estimates its layout from a few rows of each query block: their softmax
over every key, summed per key block (``patterns.shared.estimating_probs`` and a sum in
torch: an fp32 score tensor of an eighth of the score matrix written and read again, 25 ms
of a 31.5 ms op at 16k on the H200, docs/benchmarks.md). Here one program takes
``BLOCK_M`` estimating rows of one head and walks the keys once: each key block's
log-sum-exp of its scores (one exponential a score) and, from those, each row's running
maximum and normaliser, flash-style; the masses are ``2 ** (block lse - row lse)``, made
from ``[rows, key blocks]`` numbers after the walk. (A first version walked the keys twice,
row maxima and normalisers first, then the masses: twice the scores and exponentials.) The
causal cut is applied; a site with a user mask keeps the torch estimate (its mask rows are
added there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsec.ir import config
from sparsec.patterns import get_pattern
from sparsec.patterns.base import register_piece

_LOG2E = 1.4426950408889634


@triton.jit
def _row_block_lse_kernel(Q, K, OUT, ROW_LSE, ROWS, HEADS,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                          num_rows, n_q, n_k, head_dim, kv_ratio, num_heads, scale_log2,
                          BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr,
                          TF32X3_DOT: tl.constexpr):
    """OUT ``[.., rows, key blocks]``: each key block's log2-sum-exp2 of a row's scores (log2
    units; -inf where the block keeps nothing); ROW_LSE ``[.., rows]``: the row's over every key."""
    tile = tl.program_id(0)
    batch = tl.program_id(1) // num_heads
    slot = tl.program_id(1) % num_heads
    head = tl.load(HEADS + slot)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_rows
    rows = tl.load(ROWS + offs_m, mask=row_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    if IEEE_DOT:
        q = q.to(tl.float32)
    k_base = K + batch * stride_kb + (head // kv_ratio) * stride_kh
    # Keys past the last row's diagonal have no mass (rows are in ascending order).
    end = n_k
    if CAUSAL:
        end = tl.minimum(n_k, tl.max(tl.where(row_ok, rows, 0)) + n_k - n_q + 1)
    out_base = OUT + batch * stride_ob + slot * stride_oh + offs_m[:, None] * stride_om
    per_tile: tl.constexpr = BLOCK_N // BLOCK
    offs_blocks = tl.arange(0, per_tile)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, end, BLOCK_N):
        s = _scores(q, k_base, rows, start + offs_n, offs_d, stride_kn, n_q, n_k, head_dim, scale_log2,
                    CAUSAL, IEEE_DOT, TF32X3_DOT)
        s = tl.reshape(s, (BLOCK_M, per_tile, BLOCK))
        m_b = tl.max(s, 2)
        m_b = tl.where(m_b == float("-inf"), 0.0, m_b)            # a block with nothing kept: sum 0
        l_b = tl.sum(tl.exp2(s - m_b[:, :, None]), 2)
        blocks = start // BLOCK + offs_blocks
        tl.store(out_base + blocks[None, :], tl.where(l_b > 0, m_b + tl.log2(l_b), float("-inf")),
                 mask=row_ok[:, None] & (blocks[None, :] * BLOCK < n_k))
        m_new = tl.maximum(m_i, tl.max(tl.where(l_b > 0, m_b, float("-inf")), 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)       # rows with nothing kept yet
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.where(l_b > 0, l_b * tl.exp2(m_b - m_use[:, None]), 0.0), 1)
        m_i = m_new
    row_lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))    # a fully masked row: -inf
    tl.store(ROW_LSE + batch * stride_lb + slot * stride_lh + offs_m, row_lse, mask=row_ok)


@triton.jit
def _scores(q, k_base, rows, cols, offs_d, stride_kn, n_q, n_k, head_dim, scale_log2,
            CAUSAL: tl.constexpr, IEEE_DOT: tl.constexpr, TF32X3_DOT: tl.constexpr):
    """``q . k`` of one key tile in log2 units, -inf where the keys end or the causal cut is.
    fp32 inputs take three tf32 products (an IEEE fp32 dot ran 100x slower on the H200: 122
    against 0.4 ms at 8k); the CPU interpreter takes an fp32 dot (it misreads bf16)."""
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :],
                mask=(cols[:, None] < n_k) & (offs_d[None, :] < head_dim), other=0.0)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    elif TF32X3_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
    else:
        s = tl.dot(q, tl.trans(k))
    keep = cols[None, :] < n_k
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + n_k - n_q)
    return tl.where(keep, s * scale_log2, float("-inf"))


def row_block_mass(q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor, scale: float,
                   causal: bool, block: int) -> torch.Tensor:
    """fp32 ``[B, len(heads), len(rows), ceil(n_k / block)]``: the softmax mass query head
    ``heads[i]``'s row ``rows[j]`` (ascending) of ``q`` ``[B, Hq, n_q, D]`` gives each key
    block of ``k`` ``[B, Hk, n_k, D]`` (GQA: query head ``h`` reads key head ``h * Hk // Hq``),
    under the causal cut. ``block`` is a power of 2."""
    batch, num_q_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    lse = torch.full((batch, len(heads), len(rows), triton.cdiv(n_k, block)), float("-inf"), dtype=torch.float32,
                     device=q.device)
    if lse.numel() == 0:
        return lse.exp2()
    row_lse = torch.empty(lse.shape[:3], dtype=torch.float32, device=q.device)
    q, k = q.contiguous() if q.stride(-1) != 1 else q, k.contiguous() if k.stride(-1) != 1 else k
    interpret = config.triton_interpret()
    block_m = 16 if interpret else 64
    grid = (triton.cdiv(len(rows), block_m), batch * len(heads))
    _row_block_lse_kernel[grid](
        q, k, lse, row_lse, rows.to(device=q.device, dtype=torch.int32), heads.to(device=q.device, dtype=torch.int32),
        *q.stride()[:3], *k.stride()[:3], *lse.stride()[:3], *row_lse.stride()[:2],
        len(rows), n_q, n_k, head_dim, num_q_heads // k.shape[1], len(heads), scale * _LOG2E,
        BLOCK=block, BLOCK_M=block_m, BLOCK_N=max(block, 64), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        CAUSAL=causal, IEEE_DOT=interpret, TF32X3_DOT=q.dtype == torch.float32, num_warps=4)
    # A row with no key (n_q > n_k under the causal cut) gives no mass.
    return torch.where(row_lse[..., None] > float("-inf"), (lse - row_lse[..., None]).exp2(), 0.0)


@register_piece("triton_estimate", "dynamic_blocks")
def dynamic_blocks_estimate(params: dict, q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor,
                            rows: torch.Tensor, scale: float, causal: bool) -> tuple:
    """The family's estimate of a site without a user mask, its row masses from the kernel;
    None for a block that is not a power of 2 (the torch estimate serves it)."""
    block = int(params["block"])
    if block & (block - 1):
        return None
    row_mass = row_block_mass(q, k, heads, rows, scale, causal, block)
    return get_pattern("dynamic_blocks").layout_from_row_mass(params, row_mass, q.shape[2], k.shape[2], causal)
