"""Budgets for the layerwise sparsity search, and the error metrics they are measured in.

A budget says how far the search may go. Exactly one limit is set:

    sparsec.Budget(max_error=0.02)                   # relative L2 of the outputs at most 2 %
    sparsec.Budget(max_error=0.01, metric="kl")      # KL(dense || sparse) of the logits
    sparsec.Budget(max_error=0.005, metric="cosine") # 1 - cosine similarity of embeddings
    sparsec.Budget(max_error=0.1, metric=my_metric)  # my_metric(dense_out, sparse_out) -> float
    sparsec.Budget(target_speedup=2.0)               # least error at >= 2x predicted attention speed
    sparsec.Budget(max_density=0.3)                  # least error at <= 30 % mean attention density

    cm = sparsec.compile(model, (ids,), calibration=batches, target="h100",
                         budget=sparsec.Budget(max_error=0.02, seq_len=8192))

``max_error`` minimises predicted attention time with the summed per-layer error at most
the budget, then checks the plan on held-out calibration batches and re-densifies layers
until the measured error is within it. ``target_speedup`` and ``max_density`` are the dual:
they minimise the summed error under a time or density cap (the error is measured and
recorded, not enforced).

Metrics take the dense and the sparse model outputs (any pytree of tensors) and return a
float, larger meaning worse; the error of a plan is the mean over calibration batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from sparsec.ir.inputs import relative_l2

Metric = Callable[[Any, Any], float]


def _first_float(output: Any) -> torch.Tensor:
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise ValueError("the model output holds no floating-point tensor to measure an error on")


def kl_divergence(dense: Any, sparse: Any) -> float:
    """KL(softmax(dense) || softmax(sparse)) over the last dimension of the first
    floating-point output (the logits), averaged over every other position."""
    return _kl_against(dense)(sparse)


# Dense log-probabilities kept per dense output by the KL measured against it repeatedly
# (log p and p: 800 MiB for SmolLM2's 2k x 49k logits); rows past this are recomputed.
KL_CACHE_BYTES = 1 << 30


def _kl_against(dense: Any) -> Callable[[Any], float]:
    """:func:`kl_divergence` against ``dense``, with the dense half (log p, p) computed once."""
    dense_rows = _first_float(dense).flatten(0, -2)
    # fp32 in row chunks: float64 over a 2k x 49k vocabulary cost 6 s a batch (SmolLM2), and
    # fp32 log-probabilities keep the KL's error near 1e-6, far below any tolerance.
    chunks, kept = [], 0

    def probabilities(p_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = torch.log_softmax(p_rows.float(), dim=-1)
        return log_p, log_p.exp()

    for p_rows in dense_rows.split(512):
        kept += 2 * p_rows.numel() * 4
        chunks.append(probabilities(p_rows) if kept <= KL_CACHE_BYTES else p_rows)

    # log q of a chunk, one buffer for every chunk and call: a fresh 100 MiB buffer per chunk
    # (SmolLM2) cost more in page faults than the arithmetic (0.7 s a call against 0.2 s).
    buffer = torch.empty(0, device=dense_rows.device)

    def kl(sparse: Any) -> float:
        sparse_rows = _first_float(sparse).flatten(0, -2)
        total = 0.0
        for chunk, q_rows in zip(chunks, sparse_rows.split(512)):
            log_p, p = chunk if isinstance(chunk, tuple) else probabilities(chunk)
            log_q = buffer.resize_(q_rows.shape)
            torch.log_softmax(q_rows, dim=-1, dtype=torch.float32, out=log_q)
            # p * (log p - log q), in place in log q's buffer: the same sums, no temporaries.
            terms = log_q.neg_().add_(log_p).mul_(p)
            total += float(terms.sum(-1).double().sum())
        return max(total / max(dense_rows.shape[0], 1), 0.0)

    return kl


def cosine_error(dense: Any, sparse: Any) -> float:
    """1 - cosine similarity along the last dimension of the first floating-point output
    (the embeddings), averaged over every other position."""
    a, b = _first_float(dense).double(), _first_float(sparse).double()
    return float((1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())


METRICS: dict[str, Metric] = {
    "rel_l2": relative_l2,       # ||sparse - dense|| / ||dense|| over every float output
    "kl": kl_divergence,
    "cosine": cosine_error,
}


def metric_name(metric: "str | Metric") -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")


def measure(metric: "str | Metric", dense_out: Any, sparse_out: Any) -> float:
    """``metric`` (a name of :data:`METRICS` or a function) of one batch."""
    return float((METRICS[metric] if isinstance(metric, str) else metric)(dense_out, sparse_out))


def measure_against(metric: "str | Metric", dense_out: Any) -> Callable[[Any], float]:
    """``metric`` of any sparse output against ``dense_out``, equal to :func:`measure`, with
    work on the dense side done once (the KL's dense log-probabilities): for verification,
    which measures every densify round against the same dense outputs."""
    if metric == "kl":
        return _kl_against(dense_out)
    return lambda sparse_out: measure(metric, dense_out, sparse_out)


@dataclass(frozen=True)
class Budget:
    """How much the sparse model may differ from the dense one, or how fast it must be.

    Args:
        max_error: largest allowed error of the whole model under ``metric``.
        metric: ``"rel_l2"`` (relative L2 of the outputs), ``"kl"`` (KL divergence of
            logits), ``"cosine"`` (1 - cosine of embeddings) or ``f(dense_out, sparse_out)``.
        target_speedup: instead of ``max_error``: predicted speedup to reach, of attention
            (and the linears, when weight sparsity is searched too).
        max_density: instead of ``max_error``: largest mean fraction of attention computed.
        seq_len: length at which costs are predicted (the length you will serve); default
            the longest calibration length. Patterns are elastic, so this may exceed it.
        per_head: measure sensitivity and allocate per head (``heads x levels`` suffix runs
            per layer) instead of per layer (``levels`` runs per layer).
        max_patterns_per_layer: at most this many distinct patterns (launches after head
            fusion) in one layer, dense counted.
        recall_levels: recall targets of the candidate ladder, one level each (plus dense).
        held_out: calibration batches kept for verification, never used for sensitivity;
            default a third of them (at least one) when there are two or more.
    """

    max_error: float | None = None
    metric: "str | Metric" = "rel_l2"
    target_speedup: float | None = None
    max_density: float | None = None
    seq_len: int | None = None
    per_head: bool = False
    max_patterns_per_layer: int | None = None
    recall_levels: tuple[float, ...] = (0.99, 0.98, 0.95, 0.9, 0.8)
    held_out: int | None = None

    def __post_init__(self):
        limits = {"max_error": self.max_error, "target_speedup": self.target_speedup,
                  "max_density": self.max_density}
        given = [name for name, value in limits.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"a Budget takes exactly one of max_error, target_speedup, max_density; got "
                             f"{given or 'none'} — e.g. Budget(max_error=0.02) or Budget(target_speedup=2.0)")
        if self.max_error is not None and not self.max_error >= 0:
            raise ValueError(f"max_error must be >= 0, got {self.max_error}")
        if self.target_speedup is not None and not self.target_speedup > 0:
            raise ValueError(f"target_speedup must be > 0, got {self.target_speedup}")
        if self.max_density is not None and not 0 < self.max_density <= 1:
            raise ValueError(f"max_density must be in (0, 1], got {self.max_density}")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use one of {sorted(METRICS)} "
                             "or a function (dense_out, sparse_out) -> float")
        if self.max_patterns_per_layer is not None and self.max_patterns_per_layer < 1:
            raise ValueError("max_patterns_per_layer must be at least 1 (dense counts as one)")
        if not self.recall_levels or not all(0 < r <= 1 for r in self.recall_levels):
            raise ValueError(f"recall_levels must be recall targets in (0, 1], got {self.recall_levels}")

    @property
    def mode(self) -> str:
        """``"error"``, ``"speedup"`` or ``"density"``: which limit this budget sets."""
        if self.max_error is not None:
            return "error"
        return "speedup" if self.target_speedup is not None else "density"

    @property
    def metric_name(self) -> str:
        return metric_name(self.metric)

    def measure(self, dense_out: Any, sparse_out: Any) -> float:
        """The metric of one batch: how far ``sparse_out`` is from ``dense_out``."""
        return measure(self.metric, dense_out, sparse_out)

    def to_dict(self) -> dict:
        return {"max_error": self.max_error, "metric": self.metric_name, "target_speedup": self.target_speedup,
                "max_density": self.max_density, "seq_len": self.seq_len, "per_head": self.per_head,
                "max_patterns_per_layer": self.max_patterns_per_layer,
                "recall_levels": list(self.recall_levels), "held_out": self.held_out}
