"""The sparsec version, written into plans, artifacts, exports and generated kernels."""
__version__ = "0.1.0"
