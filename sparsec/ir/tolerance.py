"""How far a compiled model may drift from the dense one before compile densifies heads.

Every compile ends with verification (``passes/verify.py``): the compiled plan and the dense
model run on the verification inputs and the measured error is compared with a
:class:`Tolerance`. The default depends on what the model returns:

- **language models** (an output with ``logits``, as every Hugging Face ``*ForCausalLM``
  returns): mean KL(dense || sparse) of the next-token distributions at most
  :data:`LM_MAX_KL` nats per position, *and* top-1 next-token agreement at least
  :data:`LM_MIN_TOP1`;
- **anything else**: relative L2 of the outputs at most :data:`DEFAULT_MAX_REL_L2`.

``compile(tolerance=0.05)`` keeps the default metric with another limit,
``compile(tolerance=Tolerance("cosine", 0.01))`` picks the metric, and ``tolerance=None``
switches enforcement off: the error is still measured, recorded and, above the default,
warned about.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparsec.ir.budget import METRICS, Budget, Metric, measure, measure_against, metric_name

LM_MAX_KL = 0.02
LM_MIN_TOP1 = 0.98
DEFAULT_MAX_REL_L2 = 0.05


def logits_of(output: Any) -> torch.Tensor | None:
    """The ``logits`` of a language-model output (a ``ModelOutput`` or dict), else None."""
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and logits.is_floating_point() else None


def top1_agreement(dense: Any, sparse: Any) -> float:
    """Fraction of positions whose most likely next token is the same in both outputs."""
    return float((logits_of(dense).argmax(-1) == logits_of(sparse).argmax(-1)).double().mean())


@dataclass(frozen=True)
class Tolerance:
    """``metric`` (a name of :data:`sparsec.ir.budget.METRICS` or ``f(dense, sparse) -> float``)
    at most ``max_error``; for language models also top-1 agreement at least ``min_top1``."""

    metric: "str | Metric"
    max_error: float
    min_top1: float | None = None

    def __post_init__(self):
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise ValueError(f"unknown tolerance metric {self.metric!r}; use one of {sorted(METRICS)} "
                             "or a function (dense_out, sparse_out) -> float")
        if not self.max_error >= 0:
            raise ValueError(f"tolerance max_error must be >= 0, got {self.max_error}")

    @property
    def metric_name(self) -> str:
        return metric_name(self.metric)

    def measure(self, dense: Any, sparse: Any) -> float:
        return measure(self.metric, dense, sparse)

    def against(self, dense: Any) -> Callable[[Any], float]:
        """:meth:`measure` against ``dense`` for any sparse output, the dense side's work done once."""
        return measure_against(self.metric, dense)

    def holds(self, error: float, top1: float | None) -> bool:
        return error <= self.max_error and (self.min_top1 is None or top1 is None or top1 >= self.min_top1)

    def excess(self, error: float, top1: float | None) -> float:
        """How far ``(error, top1)`` is from the tolerance as a ratio (1 at the limit): the
        larger of the error over ``max_error`` and the top-1 disagreement over the allowed one."""
        ratios = [_ratio(error, self.max_error)]
        if self.min_top1 is not None and top1 is not None:
            ratios.append(_ratio(1.0 - top1, 1.0 - self.min_top1))
        return max(ratios)

    def describe(self) -> str:
        text = f"{self.metric_name} <= {self.max_error:g}"
        return text + (f" and top-1 agreement >= {self.min_top1:g}" if self.min_top1 is not None else "")

    def to_dict(self) -> dict:
        return {"metric": self.metric_name, "max_error": self.max_error, "min_top1": self.min_top1}


def default_tolerance(dense_output: Any, budget: Budget | None = None) -> Tolerance:
    """The tolerance compile enforces when the user names none (see the module docstring);
    an error budget's own metric and limit when there is one."""
    if budget is not None and budget.mode == "error":
        return Tolerance(budget.metric, budget.max_error)
    if logits_of(dense_output) is not None:
        return Tolerance("kl", LM_MAX_KL, LM_MIN_TOP1)
    return Tolerance("rel_l2", DEFAULT_MAX_REL_L2)


def resolve_tolerance(tolerance: Any, dense_output: Any, budget: Budget | None) -> tuple[Tolerance, bool]:
    """The tolerance to measure against and whether compile enforces it (densifies)."""
    default = default_tolerance(dense_output, budget)
    if tolerance is None:
        return default, False
    if isinstance(tolerance, Tolerance):
        return tolerance, True
    if tolerance == "auto":
        # A speed or density budget asks for that speed: measured and warned about, not undone.
        return default, budget is None or budget.mode == "error"
    if isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool):
        return Tolerance(default.metric, float(tolerance), default.min_top1), True
    raise ValueError(f"tolerance must be 'auto', a number, a sparsec.Tolerance or None; got {tolerance!r}")


def _ratio(value: float, limit: float) -> float:
    if limit > 0:
        return value / limit
    return 0.0 if value <= 0 else float("inf")
