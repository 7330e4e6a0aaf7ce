"""Custom mode: every head group of a ``sparsec.sparse_attention`` site becomes one
``ai.sparsec::SparseAttention`` node (see :mod:`.schema`), fed by the group's heads.

The pattern kind and its elastic parameters travel as attributes, so the op derives its
layout from the length it runs at; a bulky part of the parameters (``block_topk``'s
layout: ``Pattern.split_initializer``) travels as a boolean initializer (the ``layout``
input) rather than inside the JSON. The nodes compute in fp32,
as the reference does; a half-precision model casts around them.
"""
from __future__ import annotations

import json

from onnx import TensorProto
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Opset

from sparsec.patterns import get_pattern
from sparsec.ir.plan import decode_groups

from sparsec.codegen.onnx.heads import additive_bias, group_inputs, merge_heads
from sparsec.codegen.onnx.schema import DOMAIN, OP_VERSION

SPARSEC = Opset(DOMAIN, OP_VERSION)


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
        params, layout = get_pattern(group.pattern).split_initializer(group.params)
        layout_value = None if layout is None else op.Constant(value=ir.tensor(layout))
        outputs.append(SPARSEC.SparseAttention(
            inputs.q, inputs.k, inputs.v, inputs.bias, layout_value, pattern=group.pattern,
            params=json.dumps(params, sort_keys=True), scale=float(scale), causal=int(causal)))
    out = merge_heads(outputs, [g.heads for g in head_groups])
    return out if dtype == ir.DataType.FLOAT else op.Cast(out, to=int(dtype))
