"""``export_onnx``: a compiled graph to an ONNX file, through ``torch.onnx.export(dynamo=True)``
with sparsec's translation table.

Modes:

- ``custom``: each head group of a sparse site is one ``ai.sparsec::SparseAttention``
  node (:mod:`.custom`); run it with ``sparsec.runtime.ort_session``.
- ``decomposed``: standard ONNX ops only (:mod:`.decompose`); any ONNX runtime runs it.

Sites left dense (``sparsec.attention``) are standard ops in both modes, and so are
sparse linears (``sparsec.sparse_linear``, :mod:`.linear`: compressed initializers, decompressed
in the graph). The plan JSON,
the sparsec version, the mode and the op set travel in the model's ``metadata_props``
(keys in :data:`METADATA_KEYS`).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import onnx
import torch

from sparsec.ir.plan import Plan

from sparsec.codegen.onnx import schema
from sparsec.codegen.onnx.custom import sparse_attention_custom
from sparsec.codegen.onnx.decompose import attention_decomposed, sparse_attention_decomposed
from sparsec.codegen.onnx.linear import sparse_linear

MODES = ("custom", "decomposed")
METADATA_KEYS = ("sparsec.version", "sparsec.plan", "sparsec.mode", "sparsec.op_domain",
                 "sparsec.example_shapes")
# Default-domain opsets the export supports: the translations are written against opset 18
# (onnxscript ``opset18``, torch's own torchlib opset), up to the newest both torch's
# exporter and the installed onnx know. Others are refused, not silently replaced.
MIN_OPSET = 18


def max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:         # a torch without the constant: trust onnx alone
        ONNX_MAX_OPSET = onnx.defs.onnx_opset_version()
    return min(ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


def check_opset(opset: "int | None") -> None:
    """Raise :class:`~sparsec.ir.errors.InvalidArgumentError` for an opset outside
    ``MIN_OPSET .. max_opset()`` (``None``, the exporter's default, passes)."""
    from sparsec.ir.errors import InvalidArgumentError

    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise InvalidArgumentError(
            f"opset {opset!r} is not supported by the ONNX export: choose a default-domain opset from "
            f"{MIN_OPSET} to {max_opset()} (sparsec's translations need opset {MIN_OPSET} ops), or leave "
            "it unset for the exporter's default")


def check_dtypes(graph_module: torch.fx.GraphModule, example_args: tuple, example_kwargs: dict) -> None:
    """Refuse bfloat16 weights or inputs: onnxruntime's CPU kernels (MatMul, Softmax, ...)
    do not implement bfloat16, so such a file cannot be opened on CPU."""
    from sparsec.ir.errors import UnsupportedDtypeError

    tensors = [*graph_module.parameters(), *graph_module.buffers(),
               *(t for t in torch.utils._pytree.tree_leaves((example_args, example_kwargs))
                 if isinstance(t, torch.Tensor))]
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise UnsupportedDtypeError(
            "the compiled model holds bfloat16 weights or inputs, and onnxruntime's CPU kernels do not "
            "implement bfloat16, so the exported file could not be run on CPU; compile a float32 copy "
            "(model.float(), float32 example inputs) and export that")


# Above this many bytes of weights the file keeps them in external data (protobuf's 2 GB cap).
_EXTERNAL_DATA_BYTES = 1 << 30


def translation_table(mode: str, materialize: bool = False) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: sparsec op -> ONNX Script function."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose 'custom' (sparsec custom ops, run with "
                         "sparsec.runtime.ort_session) or 'decomposed' (standard ONNX ops only)")
    sparse = (sparse_attention_custom if mode == "custom"
              else functools.partial(sparse_attention_decomposed, materialize=materialize))
    return {torch.ops.sparsec.sparse_attention.default: sparse,
            torch.ops.sparsec.attention.default: attention_decomposed,
            torch.ops.sparsec.sparse_linear.default: sparse_linear}


def _example_shapes(args: tuple, kwargs: dict) -> list[list[int]]:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]


def export_onnx(graph_module: torch.fx.GraphModule, example_args: tuple, example_kwargs: dict,
                plan: Plan, path: "str | Path", mode: str = "custom", opset: int | None = None,
                dynamic_length: bool = True) -> Path:
    """Export a compiled graph to ``path`` and check it with ``onnx.checker`` (full check).

    Args:
        graph_module, example_args, example_kwargs, plan: the ``CompiledModel``'s.
        mode: ``"custom"`` or ``"decomposed"`` (see the module docstring).
        opset: the default-domain opset, ``MIN_OPSET`` to :func:`max_opset` (``None``: the
            exporter's default); others raise ``InvalidArgumentError``. bfloat16 models raise
            ``UnsupportedDtypeError`` (onnxruntime's CPU kernels lack bfloat16).
        dynamic_length: keep every input dimension the capture left symbolic (sequence
            length, batch) symbolic. ``False`` exports at the example's shapes; in
            decomposed mode static masks are then stored as initializers.
    """
    from sparsec.ir.version import __version__
    from sparsec.passes.helpers.capture import export_program

    table = translation_table(mode, materialize=not dynamic_length)
    check_opset(opset)
    check_dtypes(graph_module, example_args, example_kwargs)
    dynamic = dynamic_length and plan.capture.get("dynamic", True)
    program = export_program(graph_module, example_args, example_kwargs, dynamic=dynamic)
    onnx_program = torch.onnx.export(program, example_args, kwargs=example_kwargs, dynamo=True,
                                     opset_version=opset, custom_translation_table=table)
    onnx_program.model.metadata_props.update({
        "sparsec.version": __version__, "sparsec.plan": plan.to_json(indent=None), "sparsec.mode": mode,
        "sparsec.op_domain": f"{schema.DOMAIN}:{schema.OP_VERSION}",
        "sparsec.example_shapes": json.dumps(_example_shapes(example_args, example_kwargs))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(p.numel() * p.element_size() for p in graph_module.parameters())
    onnx_program.save(str(path), external_data=weights > _EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path), full_check=True)
    return path
