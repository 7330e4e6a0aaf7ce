"""onnxruntime sessions for models sparsec exported, with sparsec's custom ops registered.

:func:`ort_session` opens an ONNX file. When the model uses the ``ai.sparsec`` operator
set (custom mode, see :mod:`sparsec.codegen.onnx.schema`), it registers the ops'
implementations first: onnxruntime-extensions Python ops backed by
:mod:`sparsec.runtime.cpu_attention`, which reads only the keys each chunk of queries keeps.

onnxruntime-extensions serves Python ops from its own domain ``ai.onnx.contrib`` with a
fixed number of inputs, so the session is built from an in-memory copy of the model whose
sparsec nodes point at that Python op, absent optional inputs filled with empty tensors.
The file is never changed: stock onnxruntime, without this registration, rejects it with
its own error (``ai.sparsec:SparseAttention(-1) is not a registered function/op``).
Decomposed models hold standard ops only and open unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

from sparsec.ir import config
from sparsec.codegen.onnx.schema import DOMAIN, OP_VERSION, SPARSE_ATTENTION
from sparsec.ir.errors import ArtifactVersionError, UnservableInputError
from sparsec.patterns import get_pattern
from sparsec.runtime.cpu_attention import group_attention

KNOWN_OP_VERSIONS = (OP_VERSION,)
_PYOP_DOMAIN = "ai.onnx.contrib"
_PYOP_TYPE = "SparsecSparseAttention"
_NO_BIAS, _NO_LAYOUT = "sparsec_no_attn_bias", "sparsec_no_layout"
_ALLOW_SPINNING = "session.intra_op.allow_spinning"
_registered = False
# Errors raised inside the Python op during the current run (see SparsecSession.run).
_op_errors: list[Exception] = []


def sparsec_op_version(model: onnx.ModelProto) -> int | None:
    """The ``ai.sparsec`` opset version a model imports, or None when it uses no sparsec op."""
    for entry in model.opset_import:
        if entry.domain == DOMAIN:
            return entry.version
    return None


def _sparse_attention(q, k, v, attn_bias, layout, pattern, params, scale, causal):
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)      # parallel work runs on the kernel's own workers
        params = json.loads(params)
        if layout.size:
            params = get_pattern(pattern).join_initializer(params, layout)
        bias = torch.from_numpy(attn_bias) if attn_bias.size else None
        out = group_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), bias, scale,
                              bool(causal), pattern, params, config.ort_rows(), config.ort_op_threads())
        return out.numpy()
    except Exception as error:  # noqa: BLE001 — re-raised by SparsecSession.run
        # An exception escaping a Python op aborts the process (onnxruntime-extensions'
        # C++ caller does not catch it): record it, return NaNs, raise after the run.
        _op_errors.append(error)
        return np.full(q.shape[:-1] + v.shape[-1:], np.nan, dtype=np.float32)
    finally:
        torch.set_num_threads(torch_threads)


def _invoke_python_op(op_id: int, feed: list, attributes: dict) -> tuple:
    # onnxruntime-extensions' own hook hands outputs back as Python lists
    # (``tolist()``): ~100x slower than the array, which its C++ side accepts as well.
    # Numeric outputs go back as flat arrays; strings as the lists the C++ side expects.
    from onnxruntime_extensions import Opdef

    opdef = Opdef._odlist[op_id]
    result = opdef.body(*feed, **opdef.cast_attributes(attributes))
    flat = []
    for array in result if isinstance(result, tuple) else (result,):
        flat.append(array.shape)
        flat.append(np.ascontiguousarray(array).reshape(-1) if array.dtype.kind in "biuf"
                    else array.flatten().tolist())
    return (op_id, *flat)


def register_python_ops() -> str:
    """Register the sparsec Python ops (once) and return the custom-op library path."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        dt = PyCustomOpDef
        onnx_op(op_type=_PYOP_TYPE, inputs=[dt.dt_float] * 4 + [dt.dt_bool], outputs=[dt.dt_float],
                attrs={"pattern": dt.dt_string, "params": dt.dt_string, "scale": dt.dt_float,
                       "causal": dt.dt_int64})(_sparse_attention)
        PyCustomOpDef.install_hooker(_invoke_python_op)
        _registered = True
    return get_library_path()


def bind_python_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose sparsec nodes call the registered Python op."""
    version = sparsec_op_version(model)
    if version not in KNOWN_OP_VERSIONS:
        from sparsec.ir.version import __version__

        raise ArtifactVersionError(
            f"the model uses {DOMAIN} operator set version {version}; sparsec {__version__} runs "
            f"version(s) {list(KNOWN_OP_VERSIONS)}. Re-export the model with this sparsec, or install "
            "the sparsec that exported it")
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    graph, fillers = bound.graph, set()
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type != SPARSE_ATTENTION:
            raise ArtifactVersionError(f"{DOMAIN}::{node.op_type} is not an op this sparsec knows "
                                       f"(it runs {SPARSE_ATTENTION}); re-export with this sparsec")
        inputs = list(node.input) + [""] * (5 - len(node.input))
        inputs[3] = inputs[3] or _NO_BIAS
        inputs[4] = inputs[4] or _NO_LAYOUT
        fillers.update(inputs[3:])
        del node.input[:]
        node.input.extend(inputs)
        node.domain, node.op_type = _PYOP_DOMAIN, _PYOP_TYPE
    empty = {_NO_BIAS: np.zeros(0, np.float32), _NO_LAYOUT: np.zeros((0, 0), bool)}
    graph.initializer.extend(onnx.numpy_helper.from_array(array, name)
                             for name, array in empty.items() if name in fillers)
    kept = [entry for entry in bound.opset_import if entry.domain not in (DOMAIN, _PYOP_DOMAIN)]
    del bound.opset_import[:]
    bound.opset_import.extend(kept + [onnx.helper.make_opsetid(_PYOP_DOMAIN, 1)])
    return bound


class SparsecSession(ort.InferenceSession):
    """An InferenceSession whose ``run`` raises what a sparsec op raised during the run."""

    def run(self, output_names, input_feed, run_options=None):
        _op_errors.clear()
        outputs = super().run(output_names, input_feed, run_options)
        if _op_errors:
            error = _op_errors[0]
            _op_errors.clear()
            raise UnservableInputError(f"sparsec SparseAttention failed on these inputs: "
                                       f"{type(error).__name__}: {error}") from error
        return outputs


def ort_session(path: "str | Path", providers: list | None = None, **session_options: Any
                ) -> ort.InferenceSession:
    """An ``onnxruntime.InferenceSession`` for ``path`` with sparsec's custom ops registered.

    ``session_options`` set attributes of ``onnxruntime.SessionOptions``
    (e.g. ``intra_op_num_threads=2``); names with a dot are session config entries
    (e.g. ``**{"session.intra_op.allow_spinning": "1"}``; for models with sparsec ops it
    defaults to "0"). Raises ``ArtifactVersionError`` when the model uses a sparsec op
    version this sparsec does not run.
    """
    model = onnx.load(str(path))
    uses_sparsec = sparsec_op_version(model) is not None
    if uses_sparsec:
        # The op's worker threads share the cores with onnxruntime's pool, whose threads
        # would otherwise spin between ops and take their time slices.
        session_options = {_ALLOW_SPINNING: "0", **session_options}
    options = ort.SessionOptions()
    for name, value in session_options.items():
        if "." in name:
            options.add_session_config_entry(name, str(value))
        else:
            setattr(options, name, value)
    providers = providers or ["CPUExecutionProvider"]
    if not uses_sparsec:
        return ort.InferenceSession(str(path), options, providers=providers)
    bound = bind_python_ops(model)
    options.register_custom_ops_library(register_python_ops())
    return SparsecSession(bound.SerializeToString(), options, providers=providers)


def ort_feeds(session: ort.InferenceSession, args: tuple = (), kwargs: dict | None = None) -> dict:
    """The session's input feed from a model call's tensors, in the exported input order
    (the tensor leaves of ``(args, kwargs)``, as torch.export flattens them)."""
    leaves = [leaf for leaf in pytree.tree_leaves((tuple(args), dict(kwargs or {})))
              if isinstance(leaf, (torch.Tensor, np.ndarray))]
    names = [i.name for i in session.get_inputs()]
    if len(leaves) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs {names}, the call has {len(leaves)} tensors")
    return {name: leaf.numpy() if isinstance(leaf, torch.Tensor) else leaf for name, leaf in zip(names, leaves)}
