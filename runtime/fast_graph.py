"""A compiled model's runner: the same graph, with less host time per node.

An exported graph calls every ATen op through its ``OpOverload``
(``torch.ops.aten.mm.default(...)``) and sparsec's attention through the custom-op
dispatcher: per node some microseconds of Python and schema matching that eager PyTorch,
calling torch's generated Python bindings, does not pay. Where the host sets the pace (small
models, short inputs: an eager model launches GPU work faster than it runs) that made a
compiled model slower than the original with every head dense (a 30-layer, 9-head Llama:
1.36x the eager host time per forward, side by side).

:func:`fast_graph` builds a GraphModule over the same tensors (shared, not copied) whose
nodes call torch's own bindings for the ops in :data:`BINDINGS` (the same kernels with the
same arguments; each pair is tested against the overload) and sparsec's attention kernels
directly (:func:`sparsec.ir.ops.dense_attention_op`,
:func:`sparsec.runtime.device_kernels.sparse_attention_direct`). ``CompiledModel`` runs it;
its ``graph_module`` stays the canonical graph that is saved, exported and inspected.
"""
from __future__ import annotations

import torch

from sparsec.ir.ops import dense_attention_op
from sparsec.runtime.device_kernels import sparse_attention_direct

aten = torch.ops.aten

# Overloads whose torch binding takes the schema's arguments in the same positions and names.
BINDINGS = {
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div, aten.neg.default: torch.neg, aten.pow.Tensor_Scalar: torch.pow,
    aten.rsqrt.default: torch.rsqrt, aten.exp.default: torch.exp, aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid, aten.mean.dim: torch.mean,
    aten.mm.default: torch.mm, aten.bmm.default: torch.bmm, aten.matmul.default: torch.matmul,
    aten.addmm.default: torch.addmm, aten.linear.default: torch._C._nn.linear,
    aten.silu.default: torch._C._nn.silu, aten.gelu.default: torch._C._nn.gelu,
    aten.layer_norm.default: torch.layer_norm, aten.embedding.default: torch.embedding,
    aten.t.default: torch.t, aten.transpose.int: torch.transpose, aten.permute.default: torch.permute,
    aten.unsqueeze.default: torch.unsqueeze, aten.reshape.default: torch.reshape,
    aten.view.default: torch.Tensor.view, aten.cat.default: torch.cat, aten.select.int: torch.select,
    aten.to.dtype: torch.Tensor.to, aten.clone.default: torch.clone,
    torch.ops.sparsec.attention.default: dense_attention_op,
    torch.ops.sparsec.sparse_attention.default: sparse_attention_direct,
}


def fast_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule computing what ``graph_module`` computes, over its tensors, with the
    :data:`BINDINGS` substitutions."""
    graph = torch.fx.Graph()
    graph._codegen = graph_module.graph._codegen     # the input / output pytree structure, shared
    graph.output(graph.graph_copy(graph_module.graph, {}))
    for node in graph.nodes:
        if node.op == "call_function" and node.target in BINDINGS:
            node.target = BINDINGS[node.target]
    return torch.fx.GraphModule(graph_module, graph)
