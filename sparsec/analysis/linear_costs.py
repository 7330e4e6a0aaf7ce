"""Which sparse linear kernel wins, from measured tables: the cost half of
``sparsec::sparse_linear`` (the kernels are :mod:`sparsec.runtime.sparse_linear_gpu`).

``2:4`` (and sparser ``1:4``) bf16/fp16 weights can run as semi-structured sparse tensors
(cuSPARSELt) and ``blockB`` weights as a Triton block-sparse matmul; either is chosen only
where the measured table says it is at least ``MIN_SPEEDUP`` times faster than cuBLAS.
"""
from __future__ import annotations

import functools
import importlib.util
import math

from sparsec.analysis.measurements import packaged
from sparsec.ir.targets import Target
from sparsec.weights.storage import Layout
from sparsec.weights.structures import parse_structure

MIN_SPEEDUP = 1.05   # below this the gain is within run-to-run spread: stay dense


def _speedup_table(run: dict) -> dict[str, dict[tuple[int, int], dict[int, float]]]:
    """A ``sparsec bench linear`` run's ``speedup``, keyed by kernel, (out, in) and tokens."""
    return {kernel: {tuple(int(x) for x in shape.split("x")): {int(m): s for m, s in by_tokens.items()}
                     for shape, by_tokens in shapes.items()}
            for kernel, shapes in run["speedup"].items()}


# Speedup of the sparse kernel over cuBLAS (dense median / sparse median), bf16, measured on
# one H100 by ``sparsec bench linear`` (docs/benchmarks.md). "2:4" is cuSPARSELt through a
# semi-structured tensor; "blockB@L" the Triton block-sparse matmul at level L.
MEASURED_SPEEDUP = _speedup_table(packaged("sparse_linear", "h100"))


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


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
