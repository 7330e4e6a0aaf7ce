"""Device code shared by sparsec's attention templates.

The generator copies these functions into every generated kernel file, so each file is
self-contained. They follow Triton's 06-fused-attention tutorial: scores in the log2
domain (the softmax scale is folded with log2(e)), an online softmax with fp32 running
max ``m_i`` and sum ``l_i``, and an fp32 accumulator.

One key tile is either *full* (every pair kept, every key in range: no masking at all) or
*masked* (the template passes the pattern's ``keep`` matrix, and K/V loads are guarded).
A query row with no kept key keeps ``m_i = -inf`` and ``l_i = 0`` and is written as 0.
"""
import triton
import triton.language as tl


@triton.jit
def _attend_tile(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn, cols, col_ok,
                 rows, row_ok, keep, M, stride_mm, stride_mn, qk_scale,
                 MASKED: tl.constexpr, MASK_KIND: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D_PAD: tl.constexpr, FP32_DOT: tl.constexpr, TMA: tl.constexpr):
    """Fold the key tile ``cols`` into the running softmax of the query tile ``rows``.

    ``cols`` are key positions (contiguous for a key block, gathered for columns);
    ``keep`` is the ``[BLOCK_M, BLOCK_N]`` pattern mask, read only when ``MASKED``.
    ``TMA``: K and V come through the tensor descriptors (Hopper's bulk copy engine) as
    the ``BLOCK_N`` rows from ``kv_row`` of their ``[B * Hkv * n_k, D]`` view; rows past
    this head's keys belong to the next head (or are zero-filled) and are cut by ``keep``.
    ``MASK_KIND``: 0 no user mask, 1 boolean (nonzero = attend), 2 additive.
    ``FP32_DOT``: both products in fp32 (exact ``ieee``), for fp32 inputs; p is still
    rounded to the input dtype first, as on the fast path.
    """
    # -- load K (V is loaded after the scores, as in the tutorial) --
    k = _load_key_rows(K, K_desc, kv_row, stride_kn, cols, col_ok, MASKED, HEAD_DIM, D_PAD, TMA)
    # -- compute qk --
    if FP32_DOT:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED or MASK_KIND != 0:
        qk = qk * qk_scale
        if MASK_KIND != 0:
            m_ptrs = M + rows[:, None].to(tl.int64) * stride_mm + cols[None, :].to(tl.int64) * stride_mn
            m_ok = row_ok[:, None] & col_ok[None, :]
            if MASK_KIND == 1:
                user = tl.load(m_ptrs, mask=m_ok, other=0)
                qk = tl.where(user != 0, qk, float("-inf"))
            else:
                qk += tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        if MASKED:
            qk = tl.where(keep, qk, float("-inf"))
        # -- online softmax update (rows with nothing kept yet stay at m = -inf, p = 0) --
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        # A full tile keeps every score finite, so m_new is finite and the scale folds
        # into one multiply-add per score (the tutorial's form; ~3% on Hopper).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    # -- accumulate p @ v --
    v = _load_key_rows(V, V_desc, kv_row, stride_vn, cols, col_ok, MASKED, HEAD_DIM, D_PAD, TMA)
    if FP32_DOT:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attend_columns(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn, Columns, n_columns,
                    key_end, first_block, done_lo, done_hi, rows, row_ok, p, M, stride_mm, stride_mn, qk_scale,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, FP32_DOT: tl.constexpr):
    """Fold the gathered key columns ``Columns[:n_columns]`` in, ``BLOCK_N`` at a time: those
    before ``key_end``, in key blocks from ``first_block`` on and outside the blocks
    ``[done_lo, done_hi)`` already computed; query positions ``p`` take the causal cut."""
    for start in range(0, n_columns, BLOCK_N):
        index = start + tl.arange(0, BLOCK_N)
        cols = tl.load(Columns + index, mask=index < n_columns, other=0)
        block = cols // BLOCK_N
        col_ok = ((index < n_columns) & (cols < key_end) & (block >= first_block)
                  & ((block < done_lo) | (block >= done_hi)))
        keep = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (p[:, None] >= cols[None, :])
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, K, V, K_desc, V_desc, kv_row, stride_kn, stride_vn,
                                     cols, col_ok, rows, row_ok, keep, M, stride_mm, stride_mn, qk_scale,
                                     True, MASK_KIND, HEAD_DIM, D_PAD, FP32_DOT, False)
    return acc, l_i, m_i


@triton.jit
def _load_key_rows(X, X_desc, kv_row, stride_xn, cols, col_ok, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                   D_PAD: tl.constexpr, TMA: tl.constexpr):
    """The ``[BLOCK_N, D_PAD]`` K or V rows ``cols``: through the descriptor (``TMA``), or
    pointer loads guarded only where a masked tile or a padded head dim needs it."""
    if TMA:
        return X_desc.load([kv_row.to(tl.int32), 0])
    offs_d = tl.arange(0, D_PAD)
    ptrs = X + cols[:, None] * stride_xn + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if D_PAD != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _program_bases(Heads, Q, K, V, Out, M, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_ob, stride_oh, stride_mb, stride_mh, num_group_heads, per_kv):
    """This program's (batch, group slot, query block, first K/V row in the ``[B * Hkv * n_k, D]``
    view) and its head's Q, K, V, Out and mask bases.

    Axis 0 walks (batch, group head), so programs of one query block over heads that
    share a kv head (GQA) run together and read the same K/V tiles from L2. Axis 1
    walks query blocks last to first: under a causal cut the late blocks are the
    longest, and starting them first evens out the tail.
    """
    pid = tl.program_id(0)
    batch = pid // num_group_heads
    slot = pid % num_group_heads
    head = tl.load(Heads + slot)
    kv_head = head // per_kv
    qb = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_row = (batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh) // stride_kn
    Q += batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    K += batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V += batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    Out += batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    M += batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
    return batch, slot, qb, kv_row, Q, K, V, Out, M


@triton.jit
def _load_query_tile(Q, stride_qn, qb, n_q, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                     D_PAD: tl.constexpr):
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return q, rows, row_ok


@triton.jit
def _store_output(acc, l_i, O, stride_on, rows, row_ok, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Epilogue: normalise by the softmax sum; rows with no kept key are written as 0."""
    offs_d = tl.arange(0, D_PAD)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = O + rows[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
