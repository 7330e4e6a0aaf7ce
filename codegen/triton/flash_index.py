"""Index-arithmetic template: sparse flash attention whose key ranges are computed from the
program id, with no lookup table. Serves ``window``, ``sink_window``, ``vertical_stripe``
and ``multi_diagonal`` (their masks: ``index_keep`` in sparsec/patterns/<family>.py).

For query block ``[r0, r1)`` (aligned key positions ``p = i + n_k - n_q``), in order:

1. diagonal bands, by increasing key position: ``window`` is the one band
   ``|d| < window``; ``multi_diagonal`` has bands ``|d - m*period| < width`` for every
   ``m`` that reaches this query block. A band covers key blocks
   ``[(p0 - d_hi) / BLOCK_N, (p1 - d_lo) / BLOCK_N]``. Per band, one loop computes the
   blocks every pair of which is kept, with no mask at all, and one loop the ragged edges
   with the elementwise mask (the first band's loops also take the sink blocks
   ``[0, ceil(sink / BLOCK_N))`` of ``HAS_SINK``: whole ones unmasked, the rest masked).
   Two loops, not one per segment, so the software pipeline refills twice per band. A cursor skips blocks an earlier band or the
   sink already computed, so no pair counts twice;
2. stripe columns (``HAS_COLUMNS``): the pattern's key columns outside the blocks above,
   gathered ``BLOCK_N`` at a time.

Masked tiles apply :func:`_index_keep`, the pattern's mask in index arithmetic, which is
exactly the reference mask. Divisions only ever see non-negative numerators (``bias`` is a
multiple of ``period`` large enough), so truncating and flooring division agree.
"""
import triton
import triton.language as tl

from sparsec.codegen.triton.flash_common import (_attend_columns, _attend_tile, _load_query_tile, _program_bases,
                                                  _store_output)


@triton.jit
def _index_keep(p, cols, n_k, sink, window, period, width, count, bias, Colmap,
                CAUSAL: tl.constexpr, HAS_SINK: tl.constexpr, HAS_COLUMNS: tl.constexpr,
                MULTI_DIAGONAL: tl.constexpr):
    """The pattern's mask for query positions ``p`` and keys ``cols``, causal cut included."""
    d = p[:, None] - cols[None, :]
    if MULTI_DIAGONAL:
        # Nearest diagonal m = round(d / period), halves to even as torch.round does.
        shifted = d + bias
        m = shifted // period
        twice_r = 2 * (shifted - m * period)
        m = m - bias // period
        m = tl.where((twice_r > period) | ((twice_r == period) & ((m & 1) == 1)), m + 1, m)
        # The nearest *kept* diagonal: the nearest one clamped to |m| < count.
        m = tl.where(count > 0, tl.minimum(tl.maximum(m, 1 - count), count - 1), m)
        keep = tl.abs(d - m * period) < width
    else:
        keep = tl.abs(d) < window
    if HAS_SINK:
        keep = keep | (cols[None, :] < sink)
    if HAS_COLUMNS:
        stripe = tl.load(Colmap + cols, mask=cols < n_k, other=0)
        keep = keep | (stripe[None, :] != 0)
    if CAUSAL:
        keep = keep & (d >= 0)
    return keep & (cols[None, :] < n_k)


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn,
                       M, stride_mm, stride_mn, Colmap, rows, row_ok, p, qk_scale, n_k,
                       first, n_first, second, n_second, third, n_third,
                       sink, window, period, width, count, bias,
                       MASKED: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_SINK: tl.constexpr, HAS_COLUMNS: tl.constexpr, MULTI_DIAGONAL: tl.constexpr,
                       MASK_KIND: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                       FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """Key blocks ``[first, first + n_first)``, ``[second, second + n_second)`` and
    ``[third, third + n_third)`` in one loop: with the pattern mask when ``MASKED``, else
    with none."""
    for t in range(0, n_first + n_second + n_third):
        block = tl.where(t < n_first, first + t, tl.where(t < n_first + n_second, second + t - n_first,
                                                          third + t - n_first - n_second))
        start_n = tl.multiple_of(block * BLOCK_N, BLOCK_N)
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        if MASKED:
            keep = _index_keep(p, cols, n_k, sink, window, period, width, count, bias, Colmap,
                               CAUSAL, HAS_SINK, HAS_COLUMNS, MULTI_DIAGONAL)
        else:
            keep = col_ok[None, :]
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row + start_n, stride_kn,
                                     stride_vn, cols, col_ok, rows, row_ok, keep, M, stride_mm, stride_mn,
                                     qk_scale, MASKED, MASK_KIND, HEAD_DIM, D_PAD, FP32_DOT, TMA)
    return acc, l_i, m_i


@triton.jit
def _sparse_attention_fwd(
        Q, K, V, Out, Heads, M, Colmap, Columns, K_desc, V_desc,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        stride_mb, stride_mh, stride_mm, stride_mn,
        num_group_heads, per_kv, n_q, n_k, qk_scale,
        sink, window, period, width, count, bias, n_columns,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_SINK: tl.constexpr, HAS_COLUMNS: tl.constexpr,
        MULTI_DIAGONAL: tl.constexpr, MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """One program: one query block of one (batch, group head); see the module docstring."""
    batch, slot, qb, kv_row, Q, K, V, Out, M = _program_bases(
        Heads, Q, K, V, Out, M, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
        stride_ob, stride_oh, stride_mb, stride_mh, num_group_heads, per_kv)
    q, rows, row_ok = _load_query_tile(Q, stride_qn, qb, n_q, BLOCK_M, HEAD_DIM, D_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Bottom-right alignment: query row i sits at key position p = i + n_k - n_q.
    p = rows + (n_k - n_q)
    p_first = qb * BLOCK_M + (n_k - n_q)
    p_last = tl.minimum(qb * BLOCK_M + BLOCK_M, n_q) - 1 + (n_k - n_q)
    key_end = n_k + qb * 0
    if CAUSAL:
        key_end = tl.minimum(key_end, tl.maximum(p_last + 1, 0))
    sink_blocks = qb * 0
    sink_full = qb * 0
    if HAS_SINK:
        sink_blocks = tl.cdiv(tl.minimum(sink, key_end), BLOCK_N)
        # Sink blocks every row of this query block sees whole need no mask.
        sink_seen = tl.minimum(sink, n_k)
        if CAUSAL:
            sink_seen = tl.minimum(sink_seen, p_first + 1)
        sink_full = tl.maximum(sink_seen, 0) // BLOCK_N

    # -- diagonal bands m_hi .. m_lo (increasing key position) --
    band_lo = qb * 0
    band_hi = qb * 0
    if MULTI_DIAGONAL:
        d_min = p_first - (n_k - 1)
        if CAUSAL:
            d_min = tl.maximum(d_min, 0)
        band_lo = (d_min - width + period + bias) // period - bias // period
        band_hi = (p_last + width - 1 + bias) // period - bias // period
        band_lo = tl.where(count > 0, tl.maximum(band_lo, 1 - count), band_lo)
        band_hi = tl.where(count > 0, tl.minimum(band_hi, count - 1), band_hi)
    band_first = sink_blocks
    cursor = sink_blocks
    for step in range(0, band_hi - band_lo + 1):
        if MULTI_DIAGONAL:
            center = (band_hi - step) * period
            half = width
            safe_half = tl.minimum(width, (period + 1) // 2)   # |d - center| < safe_half: nearest is this band
        else:
            center = 0
            half = window
            safe_half = window
        d_lo = center - half + 1
        d_hi = center + half - 1
        safe_lo = center - safe_half + 1
        safe_hi = center + safe_half - 1
        if CAUSAL:
            d_lo = tl.maximum(d_lo, 0)
            safe_lo = tl.maximum(safe_lo, 0)
        # Keys j = p - d of the band, for p in [p_first, p_last].
        j_lo = tl.maximum(p_first - d_hi, 0)
        j_end = tl.minimum(p_last - d_lo + 1, n_k)
        block_lo = tl.maximum(j_lo // BLOCK_N, cursor)
        block_hi = tl.maximum(tl.cdiv(tl.maximum(j_end, 0), BLOCK_N), block_lo)
        block_hi = tl.where(j_end > j_lo, block_hi, block_lo)
        # Blocks whose every (row, key) lies in the safe part of the band and in range.
        full_lo = tl.cdiv(tl.maximum(p_last - safe_hi, 0), BLOCK_N)
        full_hi = tl.maximum(tl.minimum(p_first - safe_lo + 1, n_k), 0) // BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, block_lo), block_hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), block_hi)
        n_sink_full = tl.where(step == 0, sink_full, 0)
        n_sink_masked = tl.where(step == 0, sink_blocks - sink_full, 0)
        acc, l_i, m_i = _attend_key_blocks(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn,
                                           M, stride_mm, stride_mn, Colmap, rows, row_ok, p, qk_scale, n_k,
                                           sink_full, n_sink_masked, block_lo, full_lo - block_lo,
                                           full_hi, block_hi - full_hi,
                                           sink, window, period, width, count, bias, True, BLOCK_N, CAUSAL,
                                           HAS_SINK, HAS_COLUMNS, MULTI_DIAGONAL, MASK_KIND, HEAD_DIM, D_PAD,
                                           FP32_DOT, TMA)
        acc, l_i, m_i = _attend_key_blocks(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn,
                                           M, stride_mm, stride_mn, Colmap, rows, row_ok, p, qk_scale, n_k,
                                           0, n_sink_full, full_lo, full_hi - full_lo, 0, 0,
                                           sink, window, period, width, count, bias, False, BLOCK_N, CAUSAL,
                                           HAS_SINK, HAS_COLUMNS, MULTI_DIAGONAL, MASK_KIND, HEAD_DIM, D_PAD,
                                           FP32_DOT, TMA)
        band_first = block_lo
        cursor = tl.maximum(cursor, block_hi)

    # -- stripe columns outside the blocks computed above --
    if HAS_COLUMNS:
        acc, l_i, m_i = _attend_columns(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn,
                                        Columns, n_columns, key_end, sink_blocks, band_first, cursor, rows, row_ok,
                                        p, M, stride_mm, stride_mn, qk_scale, BLOCK_N, CAUSAL, MASK_KIND, HEAD_DIM,
                                        D_PAD, FP32_DOT)

    # epilogue
    _store_output(acc, l_i, Out, stride_on, rows, row_ok, HEAD_DIM, D_PAD)


TEMPLATE_FUNCTIONS = (_index_keep, _attend_key_blocks, _sparse_attention_fwd)
