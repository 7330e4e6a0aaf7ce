"""The CUDA kernel of ``sparsec::sparse_linear`` and the cost model that picks it.

Per call, from the weight's structure and shape and the token count ``M``:

- ``2:4`` (and sparser ``1:4``) bf16/fp16 weights run as PyTorch semi-structured sparse
  tensors (``torch.sparse.to_sparse_semi_structured``, cuSPARSELt);
- ``blockB`` weights run the Triton block-sparse matmul
  (:mod:`sparsec.codegen.triton.block_sparse_matmul`);
- anything else, and any shape where the measured table below says the sparse kernel is
  not at least ``MIN_SPEEDUP`` times faster than cuBLAS, runs cuBLAS on the decompressed
  weight. ``SPARSEC_SPARSE_LINEAR=sparse|dense`` overrides the table.

Prepared operands (semi-structured tensor, block-CSR indices, dense weight) are built on
first use and cached per compressed ``values`` tensor, so a layer that falls back to dense
holds its dense weight on the GPU beside the compressed one.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from sparsec import config
from sparsec.targets import Target
from sparsec.weights.storage import Layout, block_csr, decode_layout, decompress
from sparsec.weights.structures import parse_structure

MIN_SPEEDUP = 1.05   # below this the gain is within run-to-run spread: stay dense

# Speedup of the sparse kernel over cuBLAS (dense median time / sparse median time) of eager
# bf16 calls on one H100, from `sparsec bench linear` (the run: sparsec/data/sparse_linear_h100.json;
# what it shows: docs/benchmarks.md). Keys: kernel -> (out_features, in_features) -> tokens M
# -> speedup. "2:4" is F.linear on a semi-structured tensor (cuSPARSELt); "blockB@L" the
# Triton kernel at level L.
MEASURED_SPEEDUP: dict[str, dict[tuple[int, int], dict[int, float]]] = {
    "2:4": {(4096, 4096): {1: 0.03, 16: 0.03, 256: 0.03, 4096: 0.38, 16384: 1.26},
            (4096, 11008): {1: 0.05, 16: 0.05, 256: 0.06, 4096: 0.57, 16384: 1.23},
            (11008, 4096): {1: 0.05, 16: 0.05, 256: 0.08, 4096: 0.9, 16384: 1.33}},
    "block32@0.50": {(4096, 4096): {1: 0.57, 16: 0.59, 256: 0.56, 4096: 0.64, 16384: 0.66},
                     (4096, 11008): {1: 0.64, 16: 0.66, 256: 0.5, 4096: 0.59, 16384: 0.69},
                     (11008, 4096): {1: 0.76, 16: 0.83, 256: 0.71, 4096: 0.64, 16384: 0.67}},
    "block32@0.75": {(4096, 4096): {1: 0.59, 16: 0.73, 256: 1.01, 4096: 1.21, 16384: 1.29},
                     (4096, 11008): {1: 1.17, 16: 1.11, 256: 0.9, 4096: 1.16, 16384: 1.35},
                     (11008, 4096): {1: 1.5, 16: 1.47, 256: 1.26, 4096: 1.29, 16384: 1.34}},
    "block64@0.50": {(4096, 4096): {1: 0.56, 16: 0.55, 256: 0.64, 4096: 1.02, 16384: 1.1},
                     (4096, 11008): {1: 1.16, 16: 1.14, 256: 0.73, 4096: 1.04, 16384: 1.08},
                     (11008, 4096): {1: 1.1, 16: 1.09, 256: 1.03, 4096: 1.09, 16384: 1.0}},
    "block64@0.75": {(4096, 4096): {1: 0.78, 16: 0.6, 256: 1.21, 4096: 1.86, 16384: 2.05},
                     (4096, 11008): {1: 1.87, 16: 1.02, 256: 1.24, 4096: 1.97, 16384: 2.27},
                     (11008, 4096): {1: 1.9, 16: 1.84, 256: 1.63, 4096: 2.04, 16384: 2.0}},
}


def _interpolate_tokens(by_tokens: dict[int, float], tokens: int) -> float:
    """Speedup at ``tokens``, linear in log(tokens) between measured counts, clamped at the ends."""
    points = sorted(by_tokens.items())
    t = math.log(max(tokens, 1))
    if t <= math.log(points[0][0]):
        return points[0][1]
    for (m0, s0), (m1, s1) in zip(points, points[1:]):
        if t <= math.log(m1):
            w = (t - math.log(m0)) / (math.log(m1) - math.log(m0))
            return s0 + w * (s1 - s0)
    return points[-1][1]


def _nearest_shape(table: dict[tuple[int, int], dict[int, float]], out_features: int, in_features: int):
    return min(table, key=lambda shape: (math.log(shape[0] / out_features) ** 2
                                         + math.log(shape[1] / in_features) ** 2))


def _measured(kernel: str, out_features: int, in_features: int, tokens: int) -> float | None:
    table = MEASURED_SPEEDUP.get(kernel)
    if not table:
        return None
    return _interpolate_tokens(table[_nearest_shape(table, out_features, in_features)], tokens)


def sparse_kernel(layout: Layout) -> str | None:
    """The sparse kernel this structure can run on a GPU, or None."""
    structure = parse_structure(layout.structure)
    if structure.kind == "n:m" and structure.m == 4 and structure.n <= 2:
        if layout.out_features % 32 == 0 and layout.in_features % 64 == 0:   # CUTLASS / cuSPARSELt tiles
            return "semi_structured"
    if structure.kind == "block" and _triton_available():
        return "block_sparse"
    return None


def predicted_speedup(layout: Layout, level: float, tokens: int) -> float | None:
    """Measured (interpolated) speedup over cuBLAS for this weight at ``tokens``; None if unmeasured."""
    kernel = sparse_kernel(layout)
    structure = parse_structure(layout.structure)
    if kernel == "semi_structured":
        return _measured("2:4", layout.out_features, layout.in_features, tokens)
    if kernel != "block_sparse":
        return None
    # Time scales with density: interpolate the time ratio between the measured levels.
    measured = {}
    for measured_level in (0.5, 0.75):
        speedup = _measured(f"block{structure.block}@{measured_level:.2f}", layout.out_features,
                            layout.in_features, tokens)
        if speedup is None:
            return None
        measured[1 - measured_level] = 1 / speedup
    slope = (measured[0.5] - measured[0.25]) / 0.25
    time_ratio = max(measured[0.5] + (1 - level - 0.5) * slope, 1e-3)
    return 1 / time_ratio


def choose_kernel(layout: Layout, level: float, tokens: int, dtype: torch.dtype) -> str:
    """``semi_structured``, ``block_sparse`` or ``dense`` for one call."""
    kernel = sparse_kernel(layout)
    if kernel is None or dtype not in (torch.float16, torch.bfloat16):
        return "dense"
    mode = config.sparse_linear_kernel()
    if mode != "auto":
        return kernel if mode == "sparse" else "dense"
    speedup = predicted_speedup(layout, level, tokens)
    return kernel if speedup is not None and speedup >= MIN_SPEEDUP else "dense"


def plan_lowering(layout: Layout, level: float, target: Target,
                  tokens: tuple[int, ...] = (1, 16, 256, 4096, 16384)) -> dict:
    """What the plan records about how this weight will run on ``target``."""
    if target.device_type != "cuda":
        return {"kernel": "dense", "reason": "CPU: reference kernel (decompress, then a dense matmul)"}
    kernel = sparse_kernel(layout)
    if kernel is None:
        return {"kernel": "dense", "reason": f"no sparse GPU kernel for {layout.structure} "
                                             f"at {layout.out_features}x{layout.in_features}"}
    if target.arch != "sm90":
        return {"kernel": "dense", "reason": f"no measured cost table for {target.arch} (measured on H100 only)"}
    speedups = {m: predicted_speedup(layout, level, m) for m in tokens}
    if any(s is None for s in speedups.values()):
        return {"kernel": "dense", "reason": f"{kernel} not in the measured cost table"}
    wins = [m for m, s in speedups.items() if s >= MIN_SPEEDUP]
    record = {"kernel": kernel if wins else "dense", "sparse_at_tokens": wins,
              "predicted_speedup": {str(m): round(s, 3) for m, s in speedups.items()}}
    if not wins:
        record["reason"] = f"{kernel} is not {MIN_SPEEDUP}x faster than cuBLAS at any of {list(tokens)} tokens"
    return record


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# -- cache of prepared operands, one entry per (values tensor, kernel, dtype) --
_prepared: dict[tuple, tuple[weakref.ref, int, object]] = {}


def _prepare(values: torch.Tensor, mask: torch.Tensor, layout: Layout, kernel: str, dtype: torch.dtype):
    key = (id(values), kernel, dtype)
    hit = _prepared.get(key)
    if hit is not None and hit[0]() is values and hit[1] == values._version:
        return hit[2]
    if kernel == "block_sparse":
        prepared = block_csr(mask, layout)
    else:
        weight = decompress(values, mask, layout).to(dtype)
        prepared = torch.sparse.to_sparse_semi_structured(weight) if kernel == "semi_structured" else weight
    _prepared[key] = (weakref.ref(values, lambda _, key=key: _prepared.pop(key, None)), values._version, prepared)
    return prepared


def sparse_linear_cuda(x, values, mask, bias, layout):
    parsed = decode_layout(layout)
    tokens = x.numel() // x.shape[-1]
    level = 1 - values.numel() / (parsed.out_features * parsed.in_features)
    kernel = choose_kernel(parsed, level, tokens, x.dtype)
    if kernel == "block_sparse" and values.dtype != x.dtype:   # the Triton kernel reads values as stored
        kernel = "dense"
    bias = None if bias is None else bias.to(x.dtype)
    if kernel == "block_sparse":
        from sparsec.codegen.triton.block_sparse_matmul import block_sparse_matmul

        crow, col = _prepare(values, mask, parsed, kernel, x.dtype)
        y = block_sparse_matmul(x.reshape(tokens, parsed.in_features), values, crow, col, bias,
                                parsed.block, parsed.out_features)
        return y.reshape(x.shape[:-1] + (parsed.out_features,))
    return F.linear(x, _prepare(values, mask, parsed, kernel, x.dtype), bias)
