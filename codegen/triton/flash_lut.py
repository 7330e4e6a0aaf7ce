"""Lookup-table template: block-sparse flash attention driven by a per-query-block list of key
blocks. Serves ``block_topk`` and any static family without a template of its own (one
static table per length, shared by every head) and
the block part of the dynamic ``vertical_slash`` (one table per batch and head, built per
input), plus ``vertical_slash``'s column part, and the dynamic ``dynamic_blocks`` (its
estimated layout as a kept-cell grid per batch and head).

Tables, built on the host (sparsec/runtime/sparse_tables.py), indexed by
(batch, group slot, query block):

- ``Lut``: key block indices, the *full* blocks first (every pair kept, all keys in
  range: computed with no mask), then the *partial* ones (masked with :func:`_lut_keep`);
- ``Counts``: ``(n_full, n_blocks, n_columns)``;
- ``Columns`` (``HAS_COLUMNS``): the key columns to gather that lie outside every listed
  block and at or before the block's last query position, ``BLOCK_N`` at a time.

``KEEP_KIND`` picks the elementwise mask of partial blocks: 1 for a kept-cell grid
stretched to this length, plus the diagonal's block (``block_topk``'s calibration layout;
any other static family's own token mask, ``Pattern.keep_grid``; ``dynamic_blocks``'
estimated layout, one grid per batch and head), 2 for ``vertical_slash``
(estimated column and offset maps).
"""
import triton
import triton.language as tl

from sparsec.codegen.triton.flash_common import (_attend_columns, _attend_tile, _load_query_tile, _program_bases,
                                                  _store_output)


@triton.jit
def _lut_keep(p, rows, cols, n_k, Layout, block, grid_q, grid_k, blocks_q, blocks_k, Colmap, Offmap,
              CAUSAL: tl.constexpr, KEEP_KIND: tl.constexpr, UNIFORM_TILES: tl.constexpr):
    """The pattern's mask for query rows (positions ``p``) and keys ``cols``, causal cut included.

    ``UNIFORM_TILES`` (block_topk, chosen per call): every tile lies inside one layout block
    of rows and one of keys, so a listed tile is kept whole by the layout and only the
    causal cut and the key range remain; this skips the per-element layout gather, whose
    2D pointers cost more registers than the rest of the kernel (spills at 128-row tiles).
    """
    d = p[:, None] - cols[None, :]
    if UNIFORM_TILES:
        keep = cols[None, :] < n_k
        if CAUSAL:
            keep = keep & (d >= 0)
        return keep
    if KEEP_KIND == 1:
        # A kept-cell grid stretched to this length (block_topk's calibration layout, or any
        # static family's token mask with block 1), or the diagonal's block.
        grid_row = tl.minimum((rows // block) * grid_q // blocks_q, grid_q - 1)
        col_block = cols // block
        grid_col = tl.minimum(col_block * grid_k // blocks_k, grid_k - 1)
        keep = tl.load(Layout + grid_row[:, None] * grid_k + grid_col[None, :]) != 0
        diagonal_block = tl.where(p >= 0, p // block, -1)
        keep = keep | (col_block[None, :] == diagonal_block[:, None])
    else:
        # vertical_slash: an estimated key column, or an estimated offset d (a slash).
        column = tl.load(Colmap + cols, mask=cols < n_k, other=0)
        index = d + (n_k - 1)
        slash = tl.load(Offmap + index, mask=(index >= 0) & (index < 2 * n_k - 1), other=0)
        keep = (column[None, :] != 0) | (slash != 0)
    if CAUSAL:
        keep = keep & (d >= 0)
    return keep & (cols[None, :] < n_k)


@triton.jit
def _sparse_attention_fwd(
        Q, K, V, Out, Heads, M, Lut, Counts, Columns, Layout, Colmap, Offmap, K_desc, V_desc,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_lb, stride_lh, stride_lq, stride_cb, stride_ch, stride_cq,
        stride_colb, stride_colh, stride_colq, stride_cmb, stride_cmh, stride_omb, stride_omh, stride_gb, stride_gh,
        num_group_heads, per_kv, n_q, n_k, qk_scale,
        block, grid_q, grid_k, blocks_q, blocks_k,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, KEEP_KIND: tl.constexpr, HAS_COLUMNS: tl.constexpr,
        MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr, UNIFORM_TILES: tl.constexpr):
    """One program: one query block of one (batch, group head); see the module docstring."""
    batch, slot, qb, kv_row, Q, K, V, Out, M = _program_bases(
        Heads, Q, K, V, Out, M, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_ob, stride_oh, stride_mb, stride_mh, num_group_heads, per_kv)
    Lut += batch.to(tl.int64) * stride_lb + slot.to(tl.int64) * stride_lh + qb.to(tl.int64) * stride_lq
    Counts += batch * stride_cb + slot * stride_ch + qb * stride_cq
    Colmap += batch.to(tl.int64) * stride_cmb + slot.to(tl.int64) * stride_cmh
    Offmap += batch.to(tl.int64) * stride_omb + slot.to(tl.int64) * stride_omh
    Layout += batch.to(tl.int64) * stride_gb + slot.to(tl.int64) * stride_gh
    n_full = tl.load(Counts)
    n_blocks = tl.load(Counts + 1)
    q, rows, row_ok = _load_query_tile(Q, stride_qn, qb, n_q, BLOCK_M, HEAD_DIM, D_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    p = rows + (n_k - n_q)          # bottom-right alignment: row i sits at key position p

    # -- full blocks: no mask --
    for t in range(0, n_full):
        start_n = tl.multiple_of(tl.load(Lut + t) * BLOCK_N, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row + start_n, stride_kn,
                                     stride_vn, cols, col_ok, rows, row_ok, col_ok[None, :], M, stride_mm,
                                     stride_mn, qk_scale, False, MASK_KIND, HEAD_DIM, D_PAD, FP32_DOT, TMA)
    # -- partial blocks: the pattern's elementwise mask --
    for t in range(n_full, n_blocks):
        start_n = tl.multiple_of(tl.load(Lut + t) * BLOCK_N, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        keep = _lut_keep(p, rows, cols, n_k, Layout, block, grid_q, grid_k, blocks_q, blocks_k,
                         Colmap, Offmap, CAUSAL, KEEP_KIND, UNIFORM_TILES)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row + start_n, stride_kn,
                                     stride_vn, cols, col_ok, rows, row_ok, keep, M, stride_mm, stride_mn,
                                     qk_scale, True, MASK_KIND, HEAD_DIM, D_PAD, FP32_DOT, TMA)
    # -- columns outside the listed blocks, gathered --
    if HAS_COLUMNS:
        Columns += batch.to(tl.int64) * stride_colb + slot.to(tl.int64) * stride_colh + qb.to(tl.int64) * stride_colq
        n_columns = tl.load(Counts + 2)
        # The host listed only columns in range and outside every listed block: no filter.
        acc, l_i, m_i = _attend_columns(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn,
                                        Columns, n_columns, n_k, 0, 0, 0, rows, row_ok, p, M, stride_mm, stride_mn,
                                        qk_scale, BLOCK_N, CAUSAL, MASK_KIND, HEAD_DIM, D_PAD, FP32_DOT)

    # epilogue
    _store_output(acc, l_i, Out, stride_on, rows, row_ok, HEAD_DIM, D_PAD)


TEMPLATE_FUNCTIONS = (_lut_keep, _sparse_attention_fwd)
