"""``sparsec::sparse_linear`` in standard ONNX ops, for both export modes.

The weight stays compressed in the file — the kept ``values`` and the packed bit ``mask``
of :mod:`sparsec.weights.storage` as initializers — and is decompressed by the graph:
unpack the bits (BitwiseAnd), number the kept units (CumSum), Gather their values, zeros
elsewhere. Everything feeding the weight is constant, so onnxruntime folds it into a
dense (zeroed) weight once, when the session is created; any runtime loads the file.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto
from onnxscript import ir
from onnxscript import opset18 as op

from sparsec.weights.storage import decode_layout

from sparsec.codegen.onnx.heads import const_i64


def _unit_mask(mask, rows: int, cols: int):
    """``unpack_bits``: bit ``i % 8`` of byte ``i // 8`` is unit ``i``, as bool ``[rows * cols]``."""
    bits = op.Constant(value=ir.tensor(np.array([[1 << i for i in range(8)]], dtype=np.uint8)))
    unpacked = op.Cast(op.BitwiseAnd(op.Unsqueeze(mask, const_i64([1])), bits), to=TensorProto.BOOL)
    return op.Slice(op.Reshape(unpacked, const_i64([-1])), const_i64([0]), const_i64([rows * cols]))


def decompressed_weight(values, mask, layout_json: str):
    """The dense ``[out_features, in_features]`` weight, zeros where pruned (``decompress``)."""
    layout = decode_layout(layout_json)
    rows, cols = layout.units()
    block = layout.block
    kept = _unit_mask(mask, rows, cols)                               # [units]
    # Kept unit u is the (number of kept units before it)-th entry of the values.
    order = op.Sub(op.CumSum(op.Cast(kept, to=TensorProto.INT64), const_i64(0)), const_i64(1))
    slots = op.Reshape(values, const_i64([-1, block * block]))       # one row per kept unit
    gathered = op.Gather(slots, op.Max(order, const_i64(0)), axis=0)  # [units, block*block]
    units = op.Where(op.Unsqueeze(kept, const_i64([1])), gathered, op.CastLike(op.Constant(value_float=0.0), values))
    if block == 1:
        return op.Reshape(units, const_i64([layout.out_features, layout.in_features]))
    tiles = op.Reshape(units, const_i64([rows, cols, block, block]))
    return op.Reshape(op.Transpose(tiles, perm=[0, 2, 1, 3]), const_i64([layout.out_features, layout.in_features]))


def sparse_linear(x, values, mask, bias, layout: str):
    """Translation of ``sparsec::sparse_linear``: ``x @ W.T + bias`` with ``W`` decompressed."""
    weight = op.CastLike(decompressed_weight(values, mask, layout), x)
    out = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return out if bias is None else op.Add(out, op.CastLike(bias, x))
