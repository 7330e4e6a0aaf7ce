"""ONNX export of compiled models: the ``ai.sparsec`` op schemas (:mod:`.schema`), the
custom-op translation (:mod:`.custom`), the standard-op decomposition (:mod:`.decompose`)
and :func:`export_onnx` (:mod:`.export`). Run exported files with
``sparsec.runtime.ort_session``."""
from sparsec.codegen.onnx.export import MODES, export_onnx, translation_table

__all__ = ["MODES", "export_onnx", "translation_table"]
