"""Graph helpers shared by both export modes, traced inside a translation function:
split a site's heads into its groups, turn the model's mask into an additive bias, and
put the groups' outputs back in head order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxscript import ir
from onnxscript import opset18 as op


def const_i64(values) -> "op.Value":
    """An int64 constant: a scalar for an int, a 1-d tensor for a list."""
    return op.Constant(value=ir.tensor(np.asarray(values, dtype=np.int64)))


def select_heads(x, heads: list[int]):
    """``x[:, heads]``: a Slice when the heads are contiguous, else a Gather."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return op.Slice(x, const_i64([heads[0]]), const_i64([heads[-1] + 1]), const_i64([1]))
    return op.Gather(x, const_i64(heads), axis=1)


@dataclass
class GroupInputs:
    q: "op.Value"
    k: "op.Value"
    v: "op.Value"
    bias: "op.Value | None"
    kv_heads: list[int]        # key/value head of each K/V row passed to the group


def group_inputs(q, k, v, bias, bias_per_head: bool, heads: list[int], num_heads: int,
                 num_kv_heads: int, expand_kv: bool = False) -> GroupInputs:
    """The group's Q heads, the K/V heads they read, and the bias rows they use.

    When the group holds whole GQA groups (every query head of each key/value head it
    touches) K/V stay shared (``Hq_g = per_kv * Hkv_g``); otherwise, or with ``expand_kv``,
    each query head gets its own copy of its key/value head.
    """
    per_kv = num_heads // num_kv_heads
    shared = sorted({h // per_kv for h in heads})
    whole_groups = heads == [kv * per_kv + r for kv in shared for r in range(per_kv)]
    kv_heads = shared if whole_groups and not expand_kv else [h // per_kv for h in heads]
    if bias is not None and bias_per_head:
        bias = select_heads(bias, heads)
    return GroupInputs(select_heads(q, heads), select_heads(k, kv_heads), select_heads(v, kv_heads),
                       bias, kv_heads)


def additive_bias(mask, dtype: ir.DataType):
    """The model's mask as a rank-4 additive bias of ``dtype`` (None stays None), and
    whether it differs between heads.

    A boolean mask (True = attend) becomes 0 / -inf; a float mask is cast.
    """
    if mask is None:
        return None, False
    if mask.dtype == ir.DataType.BOOL:
        zero = op.Constant(value=ir.tensor(np.zeros((), dtype=dtype.numpy())))
        bias = op.Where(mask, zero, op.CastLike(op.Constant(value_float=float("-inf")), zero))
    else:
        bias = op.Cast(mask, to=int(dtype))
    rank = len(mask.shape)
    if rank < 4:
        bias = op.Unsqueeze(bias, const_i64(list(range(4 - rank))))
    return bias, rank >= 3 and mask.shape[rank - 3] != 1


def merge_heads(outputs: list, head_lists: list[list[int]]):
    """Concatenate the groups' outputs along heads and restore the original head order."""
    order = [h for heads in head_lists for h in heads]
    merged = outputs[0] if len(outputs) == 1 else op.Concat(*outputs, axis=1)
    if order == sorted(order):
        return merged
    inverse = [order.index(h) for h in range(len(order))]
    return op.Gather(merged, const_i64(inverse), axis=1)
