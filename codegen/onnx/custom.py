"""Custom mode: every head group of a ``sparsec.sparse_attention`` site becomes one
``ai.sparsec::SparseAttention`` node (see :mod:`.schema`), fed by the group's heads.

The pattern kind and its elastic parameters travel as attributes, so the op derives its
layout from the length it runs at; a ``block_topk`` layout travels as a boolean
initializer (the ``layout`` input) rather than inside the JSON. The nodes compute in fp32,
as the reference does; a half-precision model casts around them.
"""
from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Opset

from sparsec.plan import decode_groups

from .heads import additive_bias, group_inputs, merge_heads
from .schema import DOMAIN, OP_VERSION

SPARSEC = Opset(DOMAIN, OP_VERSION)


def block_topk_layout(params: dict) -> np.ndarray:
    """``block_topk``'s kept blocks as a boolean ``[grid_q, grid_k]`` array."""
    grid_q, grid_k = params["grid"]
    layout = np.zeros((grid_q, grid_k), dtype=bool)
    for query_block, key_block in params["blocks"]:
        layout[query_block, key_block] = True
    return layout


def split_layout(pattern: str, params: dict) -> tuple[dict, np.ndarray | None]:
    """The node's ``params`` attribute and its ``layout`` input (None when the family has none)."""
    if pattern != "block_topk":
        return params, None
    return {k: v for k, v in params.items() if k != "blocks"}, block_topk_layout(params)


def sparse_attention_custom(q, k, v, mask, scale: float, causal: bool, groups: str):
    """Translation of ``sparsec::sparse_attention``: one ``SparseAttention`` node per group."""
    head_groups = decode_groups(groups)
    dtype, num_heads, num_kv_heads = q.dtype, q.shape[1], k.shape[1]
    if dtype != ir.DataType.FLOAT:
        # The op runs in fp32 (as the reference computes); half-precision models cast around it.
        q, k, v = (op.Cast(x, to=TensorProto.FLOAT) for x in (q, k, v))
    bias, per_head = additive_bias(mask, ir.DataType.FLOAT)
    outputs = []
    for group in head_groups:
        inputs = group_inputs(q, k, v, bias, per_head, group.heads, num_heads, num_kv_heads)
        params, layout = split_layout(group.pattern, group.params)
        layout_value = None if layout is None else op.Constant(value=ir.tensor(layout))
        outputs.append(SPARSEC.SparseAttention(
            inputs.q, inputs.k, inputs.v, inputs.bias, layout_value, pattern=group.pattern,
            params=json.dumps(params, sort_keys=True), scale=float(scale), causal=int(causal)))
    out = merge_heads(outputs, [g.heads for g in head_groups])
    return out if dtype == ir.DataType.FLOAT else op.Cast(out, to=int(dtype))
