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
keys are split in chunks of :data:`CHUNK_TILES` tiles, a program each, and the chunks' row
normalisers combined in torch: one program a row tile walked up to every key in turn, 288
programs for SmolLM2's 9 heads at 8k on 132 SMs. Key tiles are 128 keys in bf16 / fp16
(64 -> 128: 0.478 -> 0.411 ms at 32:8 heads, 8k; 0.219 -> 0.181 at SmolLM2's), 64 in fp32,
whose three tf32 products a tile need the shared memory. The causal cut is applied; a site with a
user mask keeps the torch estimate (its mask rows are added there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsec.ir import config
from sparsec.patterns import get_pattern
from sparsec.patterns.base import register_piece

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Key tiles one program walks: the keys of a row tile are split over programs, whose chunks'
# row normalisers are combined after. H200, bf16, 16 rows a block, ms, every key in one
# program -> 16 tiles (2048 keys): 32:8 heads D 128 8k 0.512 -> 0.453, 16k 1.850 -> 1.567;
# SmolLM2's 9:3 heads D 64 8k 0.319 -> 0.211 (fp32 0.413 -> 0.294); 8, 4 or 2 tiles no
# better, 1 tile slower (1.7-1.9x at 32:8: the q tile loaded once a chunk).
CHUNK_TILES = 16


@triton.jit
def _row_block_lse_kernel(Q, K, OUT, ROW_LSE, ROWS, HEADS,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lc,
                          num_rows, n_q, n_k, head_dim, kv_ratio, num_heads, scale_log2,
                          BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                          IEEE_DOT: tl.constexpr, TF32X3_DOT: tl.constexpr):
    """OUT ``[.., rows, key blocks]``: each key block's log2-sum-exp2 of a row's scores (log2
    units; -inf where the block keeps nothing); ROW_LSE ``[.., key chunks, rows]``: the row's
    over the ``CHUNK`` keys of this program's chunk."""
    tile = tl.program_id(0)
    batch = tl.program_id(1) // num_heads
    slot = tl.program_id(1) % num_heads
    chunk = tl.program_id(2)
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
    end = tl.minimum(n_k, (chunk + 1) * CHUNK)
    if CAUSAL:
        end = tl.minimum(end, tl.max(tl.where(row_ok, rows, 0)) + n_k - n_q + 1)
    out_base = OUT + batch * stride_ob + slot * stride_oh + offs_m[:, None] * stride_om
    per_tile: tl.constexpr = BLOCK_N // BLOCK
    offs_blocks = tl.arange(0, per_tile)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(chunk * CHUNK, end, BLOCK_N):
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
    tl.store(ROW_LSE + batch * stride_lb + slot * stride_lh + chunk * stride_lc + offs_m, row_lse, mask=row_ok)


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
                   causal: bool, block: int, chunk_tiles: int = CHUNK_TILES) -> torch.Tensor:
    """fp32 ``[B, len(heads), len(rows), ceil(n_k / block)]``: the softmax mass query head
    ``heads[i]``'s row ``rows[j]`` (ascending) of ``q`` ``[B, Hq, n_q, D]`` gives each key
    block of ``k`` ``[B, Hk, n_k, D]`` (GQA: query head ``h`` reads key head ``h * Hk // Hq``),
    under the causal cut. ``block`` is a power of 2; a program walks ``chunk_tiles`` key
    tiles."""
    batch, num_q_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    lse = torch.full((batch, len(heads), len(rows), triton.cdiv(n_k, block)), float("-inf"), dtype=torch.float32,
                     device=q.device)
    if lse.numel() == 0:
        return lse.exp2()
    q, k = q.contiguous() if q.stride(-1) != 1 else q, k.contiguous() if k.stride(-1) != 1 else k
    interpret = config.triton_interpret()
    # fp32 takes three tf32 products a tile, whose 128-key tiles exceed the shared memory.
    block_n = max(block, 64 if interpret or q.dtype == torch.float32 else 128)
    chunk = block_n * chunk_tiles
    row_lse = torch.empty(batch, len(heads), triton.cdiv(n_k, chunk), len(rows), dtype=torch.float32,
                          device=q.device)
    block_m = 16 if interpret else 64
    grid = (triton.cdiv(len(rows), block_m), batch * len(heads), row_lse.shape[2])
    _row_block_lse_kernel[grid](
        q, k, lse, row_lse, rows.to(device=q.device, dtype=torch.int32), heads.to(device=q.device, dtype=torch.int32),
        *q.stride()[:3], *k.stride()[:3], *lse.stride()[:3], *row_lse.stride()[:3],
        len(rows), n_q, n_k, head_dim, num_q_heads // k.shape[1], len(heads), scale * _LOG2E,
        BLOCK=block, BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal, IEEE_DOT=interpret,
        TF32X3_DOT=q.dtype == torch.float32, num_warps=4, num_stages=3)
    # The chunks' log2-sum-exp2s into the row's; a row with no key (n_q > n_k under the causal
    # cut) gives no mass.
    row_lse = (torch.logsumexp(row_lse * _LN2, dim=2) / _LN2)[..., None]
    return torch.where(row_lse > float("-inf"), (lse - row_lse).exp2(), 0.0)


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
