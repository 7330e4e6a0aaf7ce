"""sparsec: a sparsity compiler for PyTorch transformers."""
__version__ = "0.1.0"
