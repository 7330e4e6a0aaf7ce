"""The ``ai.sparsec`` ONNX operator set, registered with ``onnx.defs`` on import so that
shape inference and ``onnx.checker.check_model(full_check=True)`` know it.

Domain ``ai.sparsec``, version 1: a model's ``opset_import`` entry for the domain is the
version of every sparsec op it uses (runtimes reject versions they do not know).

``SparseAttention`` — one head group of a ``sparsec.sparse_attention`` site::

    inputs   Q          T     [B, Hq, Nq, D]
             K          T     [B, Hkv, Nk, D]    Hq is a multiple of Hkv: query head h
             V          T     [B, Hkv, Nk, Dv]   reads key/value head h // (Hq // Hkv)
             attn_bias  T     optional, additive, broadcastable to [B, Hq, Nq, Nk]
                              (the model's padding / user mask; -inf removes a key)
             layout     bool  optional [grid_q, grid_k]: a static block layout
                              (``block_topk``'s kept blocks on its calibration grid)
    output   Y          T     [B, Hq, Nq, Dv]
    attrs    pattern    string  the family: dense, skip, window, sink_window,
                                vertical_stripe, multi_diagonal, block_topk, vertical_slash
             params     string  the family's parameters as JSON (sparsec.patterns); sizes
                                are elastic, ``[a, b]`` = round(a + b*Nk) tokens, so the
                                layout is derived inside the op at the length it is run at
             scale      float   score scale (usually D ** -0.5)
             causal     int     1: keep only offsets d = i + (Nk - Nq) - j >= 0

``Y = softmax(Q K^T * scale + attn_bias, restricted to the pattern's mask) V``, exactly
``sparsec.ir.reference.sparse_attention`` for one group: a query row with no kept
key gives zeros; ``dense`` follows ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import onnx
import onnx.defs
from onnx.defs import OpSchema

DOMAIN = "ai.sparsec"
OP_VERSION = 1
SPARSE_ATTENTION = "SparseAttention"

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _infer_sparse_attention(ctx) -> None:
    # Y takes Q's element type and shape, with V's last dimension.
    q_type, v_type = ctx.get_input_type(0), ctx.get_input_type(2)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = q_type.tensor_type.elem_type
    if q_type.tensor_type.HasField("shape") and v_type.tensor_type.HasField("shape"):
        q_dims, v_dims = q_type.tensor_type.shape.dim, v_type.tensor_type.shape.dim
        if len(q_dims) == 4 and len(v_dims) == 4:
            for dim in list(q_dims[:3]) + [v_dims[3]]:
                out.tensor_type.shape.dim.add().CopyFrom(dim)
    ctx.set_output_type(0, out)


def _sparse_attention_schema() -> OpSchema:
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.AttrType
    schema = OpSchema(
        SPARSE_ATTENTION, DOMAIN, OP_VERSION, doc=__doc__,
        inputs=[OpSchema.FormalParameter("Q", "T"), OpSchema.FormalParameter("K", "T"),
                OpSchema.FormalParameter("V", "T"),
                OpSchema.FormalParameter("attn_bias", "T", param_option=optional),
                OpSchema.FormalParameter("layout", "tensor(bool)", param_option=optional)],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", _FLOATS, "attention inputs and output")],
        attributes=[OpSchema.Attribute("pattern", attr.STRING, "pattern family"),
                    OpSchema.Attribute("params", attr.STRING, "pattern parameters, JSON"),
                    OpSchema.Attribute("scale", attr.FLOAT, "score scale"),
                    OpSchema.Attribute("causal", attr.INT, "1 for causal attention")])
    schema.set_type_and_shape_inference_function(_infer_sparse_attention)
    return schema


def register_schemas() -> None:
    """Register the ``ai.sparsec`` schemas with ``onnx.defs`` (idempotent)."""
    if not onnx.defs.has(SPARSE_ATTENTION, OP_VERSION, DOMAIN):
        onnx.defs.register_schema(_sparse_attention_schema())


register_schemas()
