"""The search's linear items: weight sparsity in the same budget as attention sparsity.

Each eligible linear (``sparsify_weights``' analysis: not excluded, not tied, the shape fits
the structure) becomes one knapsack group whose options are its candidate levels, with
predicted time from the cost model (:meth:`CostModel.linear_speedup`) and, measured by the
search, the end-to-end sensitivity of pruning that linear alone. The search only decides
levels; ``sparsify_weights`` applies them after ``fuse_heads``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from sparsec.analysis.linear_sensitivity import LinearAnalysis, get_tensor
from sparsec.analysis.cost_model import CostModel
from sparsec.passes.infra.pass_manager import CompileContext
from sparsec.ir.plan import LinearPlan

from sparsec.passes import sparsify_weights


@dataclass
class LinearLevel:
    """One candidate level of one linear."""

    level: float
    local_error: float       # relative L2 change of the linear's own output (sparsify_weights' candidate error)
    seconds: float           # the linear at seq_len tokens
    speedup: float
    why: str                 # how the target would run it
    sensitivity: float = 0.0

    def record(self) -> dict:
        return {"level": self.level, "sensitivity": self.sensitivity, "local_error": self.local_error,
                "seconds": self.seconds, "speedup": self.speedup, "lowering": self.why}


@dataclass
class LinearItem:
    """What the search knows of one linear; ``options[0]`` is dense."""

    entry: LinearPlan        # the plan entry (ctx.plan.linears)
    node: torch.fx.Node
    options: list[LinearLevel]
    pruned: Callable[[float], torch.Tensor]    # level -> the weight as sparsify_weights will prune it

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def dense_seconds(self) -> float:
        return self.options[0].seconds

    def override(self, level: float) -> dict:
        """The search runner's override pruning this linear alone to ``level``."""
        return {self.node: self.pruned(level)}


def searchable(ctx: CompileContext, mode: str) -> bool:
    """Weight sparsity was asked for, with levels left to a time-minimising search."""
    return bool(ctx.weights and ctx.weights.sparsity) and not ctx.weight_levels and mode != "density"


def analyze_linears(gm: torch.fx.GraphModule, ctx: CompileContext, fitting_batches: int) -> LinearAnalysis:
    """Calibrate and score the linears on the fitting batches only (``ctx.plan.linears`` and
    ``ctx.linear_analysis``, which sparsify_weights reuses while it is current)."""
    ctx.weight_calibration_batches = fitting_batches
    return sparsify_weights.analyze_linears(gm, ctx)


def linear_items(gm: torch.fx.GraphModule, ctx: CompileContext, analysis: LinearAnalysis, cost: CostModel,
                 tokens: int) -> list[LinearItem]:
    """One item per eligible linear of ``ctx.plan.linears``, its levels timed at ``tokens``."""
    nodes = {node.name: node for node in gm.graph.nodes}
    items = []
    for entry in ctx.plan.linears:
        if not entry.eligible:
            continue
        dtype = get_tensor(gm, entry.weight).dtype
        shape = (entry.out_features, entry.in_features)
        options = []
        for candidate in entry.candidates:
            speedup, why = cost.linear_speedup(entry.structure, *shape, candidate["level"], tokens, dtype)
            options.append(LinearLevel(candidate["level"], candidate["error"],
                                       cost.linear_seconds(*shape, tokens, speedup), speedup, why))
        items.append(LinearItem(entry, nodes[entry.node], options,
                                functools.partial(analysis.pruned_weight, entry.node)))
    return items
