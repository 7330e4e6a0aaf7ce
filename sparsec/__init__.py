"""sparsec: a sparsity compiler for PyTorch transformers.

    cm = sparsec.compile(model, example_inputs=(ids,), calibration=batches, target="a100")
    y = cm(ids); print(cm.plan.summary()); cm.save("artifact/"); cm2 = sparsec.load("artifact/")
"""
from .version import __version__  # noqa: F401
from . import ops  # noqa: F401,E402  (registers torch.ops.sparsec.*)
from . import linear_ops  # noqa: F401,E402  (registers torch.ops.sparsec.sparse_linear)
from .runtime import device_kernels  # noqa: F401,E402  (the ops' CPU and CUDA kernels)
from .bisect import bisect  # noqa: E402
from .budget import Budget  # noqa: E402
from .compiler import CompiledModel, compile, load  # noqa: E402
from .errors import SparsecError  # noqa: E402
from .generation import attach  # noqa: E402
from .plan import Plan  # noqa: E402
from .targets import Target, get_target, register_target  # noqa: E402
from .tolerance import Tolerance  # noqa: E402
from .weights.config import WeightSparsity  # noqa: E402

__all__ = ["attach", "Budget", "bisect", "CompiledModel", "Plan", "SparsecError", "Target", "compile", "get_target", "load",
           "register_target", "Tolerance", "WeightSparsity"]
