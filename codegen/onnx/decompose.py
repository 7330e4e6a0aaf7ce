"""Decomposed mode: sparsec's attention ops in standard ONNX ops only, so any ONNX
runtime runs the model unchanged (no sparsec library, no custom op).

Each head group computes masked dense attention with its pattern's mask, built inside the
graph by index arithmetic on the run-time lengths — offsets ``d = i + (Nk - Nq) - j``
(Range), elastic sizes ``round(a + b*Nk)`` (Round on doubles, half to even as Python's
``round``), comparisons — so one file serves any length. With ``materialize`` (export at
a fixed length) static masks are instead computed once by ``sparsec.patterns`` and stored
as boolean initializers. ``vertical_slash`` estimates its columns and diagonals per input
with MatMul / Softmax / ScatterElements(add) / TopK, as ``VerticalSlash.estimate_indices``;
``dynamic_blocks`` its block layout with Pad / ReduceSum / TopK / CumSum.
The numbers match ``sparsec.ir.reference`` (only the speed of sparsity is lost).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto
from onnxscript import ir
from onnxscript import opset18 as op

from sparsec.patterns import Elastic, MaskOps, backend_piece, get_pattern, register_piece
from sparsec.patterns.base import MASKED_ADDITIVE
from sparsec.ir.plan import HeadGroup, decode_groups, encode_groups

from sparsec.codegen.onnx.heads import additive_bias, const_i64, group_inputs, merge_heads

_INF = float("inf")


def _const(value, dtype) -> "op.Value":
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


class _Positions:
    """Query rows, key columns and their offsets at the run-time lengths of ``q`` and ``k``."""

    def __init__(self, q, k):
        self.n_q = op.Shape(q, start=2, end=3)                  # int64 [1]
        self.n_k = op.Shape(k, start=2, end=3)
        zero, one = const_i64(0), const_i64(1)
        self.rows = op.Range(zero, op.Squeeze(self.n_q), one)
        self.cols = op.Range(zero, op.Squeeze(self.n_k), one)
        self.d = self.offsets(self.rows)

    def offsets(self, rows):
        """``d[i, j] = i + (Nk - Nq) - j`` for the given rows."""
        aligned = op.Add(rows, op.Sub(self.n_k, self.n_q))
        return op.Sub(op.Unsqueeze(aligned, const_i64([1])), op.Unsqueeze(self.cols, const_i64([0])))

    def elastic(self, value, minimum: int = 1):
        """``Elastic(a, b).at(Nk)``: ``max(minimum, round(a + b*Nk))`` as int64 [1]."""
        size = Elastic.from_json(value, minimum)
        if size.b == 0:
            return const_i64([size.at(0)])
        length = op.Cast(self.n_k, to=TensorProto.DOUBLE)
        tokens = op.Add(_const([size.a], np.float64), op.Mul(_const([size.b], np.float64), length))
        return op.Max(const_i64([minimum]), op.Cast(op.Round(tokens), to=TensorProto.INT64))


def _floor_div(x, divisor):
    # ONNX Div truncates integers toward zero; Mod(fmod=0) takes the divisor's sign, so
    # subtracting it first gives Python's floor division for negative x too.
    return op.Div(op.Sub(x, op.Mod(x, divisor)), divisor)


def _graph(value) -> "op.Value":
    """A graph value of ``value`` (a Python int or bool becomes an int64 / bool constant)."""
    if isinstance(value, _Int):
        return value.value
    if isinstance(value, bool):
        return op.Constant(value=ir.tensor(np.asarray(value)))
    if isinstance(value, int):
        return const_i64(value)
    return value


def _operator(node, swap: bool = False):
    """A binary operator of :class:`_Int` emitting ``node`` (operands swapped for ``__r*__``)."""
    def apply(self, other):
        a, b = _graph(self), _graph(other)
        return _Int(node(b, a) if swap else node(a, b))
    return apply


def _not_equal(a, b):
    return op.Not(op.Equal(a, b))


class _Int:
    """A graph value with Python's operators, so a family's ``index_keep`` (written for
    torch tensors and ints) emits ONNX ops; ``//`` and ``%`` floor as in Python."""

    def __init__(self, value):
        self.value = value

    __add__, __radd__ = _operator(op.Add), _operator(op.Add, swap=True)
    __sub__, __rsub__ = _operator(op.Sub), _operator(op.Sub, swap=True)
    __mul__, __rmul__ = _operator(op.Mul), _operator(op.Mul, swap=True)
    __floordiv__, __rfloordiv__ = _operator(_floor_div), _operator(_floor_div, swap=True)
    __mod__, __rmod__ = _operator(op.Mod), _operator(op.Mod, swap=True)
    __and__, __rand__ = _operator(op.And), _operator(op.And, swap=True)
    __or__, __ror__ = _operator(op.Or), _operator(op.Or, swap=True)
    __lt__, __le__ = _operator(op.Less), _operator(op.LessOrEqual)
    __gt__, __ge__ = _operator(op.Greater), _operator(op.GreaterOrEqual)
    __eq__, __ne__ = _operator(op.Equal), _operator(_not_equal)
    __hash__ = None

    def __invert__(self):
        return _Int(op.Not(self.value))

    def __neg__(self):
        return _Int(op.Neg(self.value))


class _OnnxOps(MaskOps):
    """:class:`~sparsec.patterns.MaskOps` emitting ONNX ops on the run-time lengths."""

    def __init__(self, pos: _Positions):
        self.pos = pos
        self.n_q, self.n_k = _Int(pos.n_q), _Int(pos.n_k)

    def size(self, value, minimum=1):
        return _Int(self.pos.elastic(value, minimum))

    def where(self, condition, if_true, if_false):
        if isinstance(condition, bool):
            return if_true if condition else if_false
        return _Int(op.Where(_graph(condition), _graph(if_true), _graph(if_false)))

    def lookup(self, table, index):
        table = np.asarray(table)
        return _Int(op.Gather(op.Constant(value=ir.tensor(table if table.dtype == bool else table.astype(np.int64))),
                              _graph(index), axis=0))

    def full(self, like, value):
        return _Int(op.Expand(_graph(bool(value)), op.Shape(_graph(like))))


def _static_keep(group: HeadGroup, pos: _Positions):
    """The boolean ``[Nq, Nk]`` mask of a static family, before the causal cut: the
    family's own ``index_keep``, emitted as ONNX ops."""
    rows = _Int(op.Unsqueeze(pos.rows, const_i64([1])))
    cols = _Int(op.Unsqueeze(pos.cols, const_i64([0])))
    keep = get_pattern(group.pattern).index_keep(group.params, rows, cols, _Int(pos.d), _OnnxOps(pos))
    return op.Expand(_graph(keep), op.Shape(pos.d))


def _scatter_flags(length_shape, indices):
    """A boolean tensor of ``length_shape`` that is True at ``indices`` along the last axis."""
    zeros = op.ConstantOfShape(length_shape, value=ir.tensor(np.zeros(1, dtype=np.float32)))
    ones = op.Expand(_const(1.0, np.float32), op.Shape(indices))
    return op.Cast(op.ScatterElements(zeros, indices, ones, axis=-1), to=TensorProto.BOOL)


def _estimating_probs(q, k, scale: float, causal: bool, pos: _Positions, bias, rows):
    """``(probs, allowed, d_rows)``: ``sparsec.patterns.shared.estimating_probs`` of the
    estimating queries at ``rows``, in ONNX; ``bias`` (the group's additive mask, or None)
    enters as it does there. ``allowed`` is None without a bias."""
    d_rows = pos.offsets(rows)                                         # [L, Nk]
    q_rows = op.Gather(q, rows, axis=2)
    scores = op.Mul(op.MatMul(q_rows, op.Transpose(k, perm=[0, 1, 3, 2])), _const(scale, np.float32))
    allowed = None
    if bias is not None:
        # The mask's rows of the estimating queries (broadcast rows expanded first), added to
        # the scores; masked keys (<= MASKED_ADDITIVE) get no mass and rank last.
        full = op.Expand(bias, op.Concat(const_i64([1, 1]), pos.n_q, pos.n_k, axis=0))
        bias_rows = op.Gather(full, rows, axis=2)
        scores = op.Add(scores, bias_rows)
        allowed = op.Greater(bias_rows, _const(MASKED_ADDITIVE, np.float32))
        if causal:
            allowed = op.And(allowed, op.GreaterOrEqual(d_rows, const_i64(0)))
        allowed = op.Expand(allowed, op.Shape(scores))
        scores = op.Where(allowed, scores, _const(-_INF, np.float32))
    elif causal:
        scores = op.Where(op.Less(d_rows, const_i64(0)), _const(-_INF, np.float32), scores)
    probs = op.Softmax(scores, axis=-1)                                # [B, H, L, Nk]
    probs = op.Where(op.IsNaN(probs), _const(0.0, np.float32), probs)  # a fully masked row: no mass
    return probs, allowed, d_rows


@register_piece("onnx", "vertical_slash")
def _vertical_slash_keep(params: dict, q, k, scale: float, causal: bool, pos: _Positions, bias=None):
    """``[B, H, Nq, Nk]``: ``VerticalSlash.estimate_indices`` then ``dynamic_mask``, in ONNX;
    ``bias`` (the group's additive mask, or None) enters the estimate as it does there."""
    # VerticalSlash.estimating_rows: count queries spread evenly, the last one included.
    count = op.Max(const_i64([1]), op.Min(const_i64([int(params.get("queries", 64))]), pos.n_q))
    ordinals = op.Range(const_i64(1), op.Squeeze(op.Add(count, const_i64([1]))), const_i64(1))
    rows = op.Sub(op.Div(op.Mul(ordinals, pos.n_q), count), const_i64([1]))
    probs, allowed, d_rows = _estimating_probs(q, k, scale, causal, pos, bias, rows)
    column_score = op.ReduceSum(probs, const_i64([2]), keepdims=0)     # [B, H, Nk]
    # Slash scores: attention summed along each offset, offset d stored at d + shift with
    # shift = max(Nq, Nk) - 1 (every offset of the score matrix, [1 - Nq, Nk - 1]).
    shift = op.Sub(op.Max(pos.n_q, pos.n_k), const_i64([1]))
    span = op.Add(shift, pos.n_k)
    batch_heads = op.Shape(probs, start=0, end=2)
    flat_probs = op.Reshape(probs, op.Concat(batch_heads, const_i64([-1]), axis=0))
    index = op.Expand(op.Reshape(op.Add(d_rows, shift), const_i64([1, 1, -1])), op.Shape(flat_probs))
    zeros = op.ConstantOfShape(op.Concat(batch_heads, span, axis=0),
                               value=ir.tensor(np.zeros(1, dtype=np.float32)))
    slash_score = op.ScatterElements(zeros, index, flat_probs, axis=2, reduction="add")
    offsets = op.Range(const_i64(0), op.Squeeze(span), const_i64(1))
    if causal:
        slash_score = op.Where(op.Less(offsets, shift), _const(-_INF, np.float32), slash_score)
    column_score = op.Where(op.Equal(pos.cols, const_i64(0)), _const(_INF, np.float32), column_score)
    slash_score = op.Where(op.Equal(offsets, shift), _const(_INF, np.float32), slash_score)
    if allowed is not None:
        # ... unless the mask removes them for every estimating query.
        open_column = op.ReduceMax(op.Cast(allowed, to=TensorProto.INT32), const_i64([2]), keepdims=0)
        column_score = op.Where(op.Greater(open_column, _const(0, np.int32)),
                                column_score, _const(-_INF, np.float32))
        flat_allowed = op.Reshape(op.Cast(allowed, to=TensorProto.FLOAT),
                                  op.Concat(batch_heads, const_i64([-1]), axis=0))
        open_slash = op.ScatterElements(zeros, index, flat_allowed, axis=2, reduction="max")
        slash_score = op.Where(op.Greater(open_slash, _const(0.0, np.float32)), slash_score,
                               _const(-_INF, np.float32))
    n_vertical = op.Min(pos.elastic(params["vertical"]), pos.n_k)
    n_slash = op.Min(pos.elastic(params["slash"]), span)
    _, columns = op.TopK(column_score, n_vertical, axis=-1)
    _, diagonals = op.TopK(slash_score, n_slash, axis=-1)
    column_mask = _scatter_flags(op.Concat(batch_heads, pos.n_k, axis=0), columns)
    offset_mask = _scatter_flags(op.Concat(batch_heads, span, axis=0), diagonals)    # offset d at d + shift
    slash = op.Gather(offset_mask, op.Add(pos.d, shift), axis=2)       # [B, H, Nq, Nk]
    keep = op.Or(op.Unsqueeze(column_mask, const_i64([2])), slash)
    return op.And(keep, op.GreaterOrEqual(pos.d, const_i64(0))) if causal else keep



@register_piece("onnx", "dynamic_blocks")
def _dynamic_blocks_keep(params: dict, q, k, scale: float, causal: bool, pos: _Positions, bias=None):
    """``[B, H, Nq, Nk]``: ``DynamicBlocks.estimate_indices`` then ``dynamic_mask``, in ONNX."""
    block, samples = int(params["block"]), int(params["samples"])
    one, size = const_i64([1]), const_i64([block])
    blocks_q = op.Div(op.Add(pos.n_q, const_i64([block - 1])), size)
    blocks_k = op.Div(op.Add(pos.n_k, const_i64([block - 1])), size)
    # DynamicBlocks.estimating_rows: samples rows of every query block, clamped to Nq - 1.
    within = np.round(np.linspace(0, block - 1, samples)).astype(np.int64)
    starts = op.Mul(op.Range(const_i64(0), op.Squeeze(blocks_q), const_i64(1)), size)
    rows = op.Min(op.Add(op.Unsqueeze(starts, one), const_i64(within[None, :])), op.Sub(pos.n_q, one))
    probs, _, _ = _estimating_probs(q, k, scale, causal, pos, bias, op.Reshape(rows, const_i64([-1])))
    pads = op.Concat(const_i64([0] * 7), op.Sub(op.Mul(blocks_k, size), pos.n_k), axis=0)
    batch_heads = op.Shape(probs, start=0, end=2)
    tiles = op.Reshape(op.Pad(probs, pads), op.Concat(batch_heads, blocks_q, const_i64([samples]), blocks_k,
                                                      size, axis=0))
    mass = op.ReduceMean(op.ReduceSum(tiles, const_i64([5]), keepdims=0), const_i64([3]), keepdims=0)
    # Forced: key block 0 and the key blocks a query block's rows reach the diagonal in.
    first = op.Add(starts, op.Sub(pos.n_k, pos.n_q))
    last = op.Sub(op.Add(op.Min(op.Add(starts, size), pos.n_q), op.Sub(pos.n_k, pos.n_q)), one)
    key_block = op.Unsqueeze(op.Range(const_i64(0), op.Squeeze(blocks_k), const_i64(1)), const_i64([0]))
    forced = op.And(op.GreaterOrEqual(key_block, op.Unsqueeze(_floor_div(first, size), one)),
                    op.LessOrEqual(key_block, op.Unsqueeze(_floor_div(last, size), one)))
    forced = op.Or(forced, op.Equal(key_block, const_i64(0)))
    # keep_by_share: the heaviest other blocks until the kept ones hold share of the row.
    zero = _const(0.0, np.float32)
    rest = op.Where(forced, zero, mass)
    ordered, order = op.TopK(rest, blocks_k, axis=-1)
    axis = const_i64([-1])
    needed = op.Sub(op.Mul(_const(float(params["share"]), np.float32), op.ReduceSum(mass, axis, keepdims=1)),
                    op.ReduceSum(op.Sub(mass, rest), axis, keepdims=1))
    before = op.Sub(op.CumSum(ordered, const_i64(-1)), ordered)
    taken = op.Cast(op.And(op.Less(before, needed), op.Greater(ordered, zero)), to=TensorProto.FLOAT)
    kept = op.Cast(op.ScatterElements(op.Mul(rest, zero), order, taken, axis=-1), to=TensorProto.BOOL)
    layout = op.Or(forced, kept)                                       # [B, H, Nq / block, Nk / block]
    keep = op.Gather(op.Gather(layout, _floor_div(pos.rows, size), axis=2), _floor_div(pos.cols, size), axis=3)
    return op.And(keep, op.GreaterOrEqual(pos.d, const_i64(0))) if causal else keep

def attend(q, k, v, bias, keep, scale: float):
    """Masked softmax attention of fp32 inputs; rows with no kept key give zeros.

    ``q`` is ``[B, H, Nq, D]``, ``k``/``v`` ``[B, H, Nk, D]`` (one K/V head per query head),
    ``keep`` a boolean mask broadcastable to the scores, or None.
    """
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), _const(scale, np.float32))
    if bias is not None:
        scores = op.Add(scores, bias)
    if keep is not None:
        scores = op.Where(keep, scores, _const(-_INF, np.float32))
    probs = op.Softmax(scores, axis=-1)
    probs = op.Where(op.IsNaN(probs), _const(0.0, np.float32), probs)
    return op.MatMul(probs, v)


def _fixed_lengths(q, k) -> tuple[int, int] | None:
    """(Nq, Nk) when the export has them static, else None."""
    n_q, n_k = q.shape[2], k.shape[2]
    return (n_q, n_k) if isinstance(n_q, int) and isinstance(n_k, int) else None


def _group_attention(group: HeadGroup, inputs, scale: float, causal: bool,
                     fixed_lengths: tuple[int, int] | None = None):
    """One group's attention (fp32 inputs); static masks are initializers when
    ``fixed_lengths`` is given."""
    q, k, v = inputs.q, inputs.k, inputs.v
    family = get_pattern(group.pattern)
    if family.computes_none:
        shape = op.Concat(op.Shape(q, start=0, end=3), op.Shape(v, start=3, end=4), axis=0)
        return op.Expand(op.CastLike(_const(0.0, np.float32), q), shape)
    pos = _Positions(q, k)
    if family.computes_all:
        # scaled_dot_product_attention's is_causal: the top-left aligned triangle.
        keep = op.GreaterOrEqual(op.Unsqueeze(pos.rows, const_i64([1])),
                                 op.Unsqueeze(pos.cols, const_i64([0]))) if causal else None
    elif family.dynamic:
        estimate = backend_piece("onnx", group.pattern)
        if estimate is None:
            raise ValueError(f"dynamic pattern {group.pattern!r} has no ONNX estimate (register_piece)")
        keep = estimate(group.params, q, k, scale, causal, pos, inputs.bias)
    elif fixed_lengths is not None:
        mask = get_pattern(group.pattern).mask(group.params, *fixed_lengths, causal)
        keep = op.Constant(value=ir.tensor(mask.numpy()))
    else:
        keep = _static_keep(group, pos)
        keep = op.And(keep, op.GreaterOrEqual(pos.d, const_i64(0))) if causal else keep
    return attend(q, k, v, inputs.bias, keep, scale)


def sparse_attention_decomposed(q, k, v, mask, scale: float, causal: bool, groups: str,
                                materialize: bool = False):
    """Translation of ``sparsec::sparse_attention`` into standard ops, group by group,
    in fp32 as the reference computes (half-precision inputs are cast)."""
    head_groups = decode_groups(groups)
    dtype, num_heads, num_kv_heads = q.dtype, q.shape[1], k.shape[1]
    fixed_lengths = _fixed_lengths(q, k) if materialize else None
    if dtype != ir.DataType.FLOAT:
        q, k, v = (op.Cast(x, to=TensorProto.FLOAT) for x in (q, k, v))
    bias, per_head = additive_bias(mask, ir.DataType.FLOAT)
    outputs = []
    for group in head_groups:
        inputs = group_inputs(q, k, v, bias, per_head, group.heads, num_heads, num_kv_heads, expand_kv=True)
        outputs.append(_group_attention(group, inputs, scale, causal, fixed_lengths))
    out = merge_heads(outputs, [g.heads for g in head_groups])
    return out if dtype == ir.DataType.FLOAT else op.Cast(out, to=int(dtype))


def attention_decomposed(q, k, v, mask, scale: float, causal: bool):
    """Translation of ``sparsec::attention`` (a site left dense) into standard ops."""
    groups = encode_groups([HeadGroup("dense", {}, list(range(q.shape[1])))])
    return sparse_attention_decomposed(q, k, v, mask, scale, causal, groups)
