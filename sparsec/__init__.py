"""sparsec: a sparsity compiler for PyTorch transformers."""
__version__ = "0.1.0"

from . import ops  # noqa: F401,E402  (registers torch.ops.sparsec.*)
