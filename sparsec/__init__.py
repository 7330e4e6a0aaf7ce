"""sparsec: a sparsity compiler for PyTorch transformers — the front door.

    cm = sparsec.compile(model, example_inputs=(ids,), calibration=batches, target="a100")
    y = cm(ids); print(cm.plan.summary()); cm.save("artifact/"); cm2 = sparsec.load("artifact/")
"""
from sparsec.ir import linear_ops, ops  # noqa: F401  (register torch.ops.sparsec.*)
from sparsec.ir.budget import Budget
from sparsec.ir.errors import SparsecError
from sparsec.ir.plan import Plan
from sparsec.ir.targets import Target, get_target, register_target
from sparsec.ir.tolerance import Tolerance
from sparsec.ir.version import __version__  # noqa: F401
from sparsec.runtime import device_kernels  # noqa: F401  (the ops' CPU and CUDA kernels)
from sparsec.weights.config import WeightSparsity
from sparsec.compiler import CompiledModel, compile, load
from sparsec.generation import attach
from sparsec.tools.bisect_plan import bisect

__all__ = ["attach", "Budget", "bisect", "CompiledModel", "Plan", "SparsecError", "Target", "compile", "get_target", "load",
           "register_target", "Tolerance", "WeightSparsity"]
