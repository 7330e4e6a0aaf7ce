"""Passes, their context and the manager that runs them.

A pass is an object with a ``name`` and ``run(gm, ctx) -> PassResult``. Instruments stay
out of pass logic: timing, logging and dumping happen here, around every pass.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch.fx

from . import config
from .dump import DumpWriter
from .plan import Plan
from .targets import Target

if TYPE_CHECKING:
    from .budget import Budget
    from .weights.config import WeightSparsity

log = logging.getLogger("sparsec")


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)
    # What the pass decided, for the NNN_<pass>.json dump (defaults to stats).
    decisions: Any = None


@dataclass
class CompileContext:
    """What passes share: the plan they write, the target, the inputs, and what compile was
    asked for (recall, budget, weight sparsity)."""

    plan: Plan
    target: Target
    example_args: tuple
    example_kwargs: dict
    calibration: list[tuple[tuple, dict]]        # (args, kwargs) per calibration batch
    # Inputs the verify pass measures the plan on; empty means the calibration batches.
    verification: list[tuple[tuple, dict]] = field(default_factory=list)
    # The serving length costs are predicted at (classification, merging); None: the
    # longest calibration length.
    seq_len: int | None = None
    # Classification: the recall a sparse pattern must reach, the share of dense time it must
    # save, and the families tried (None: every family classify_heads knows).
    recall: float = 0.95
    min_saving: float = 0.2
    patterns: tuple[str, ...] | None = None
    budget: Budget | None = None                  # the search's budget
    weights: WeightSparsity | None = None         # weight sparsity asked for (None: none)
    # Each linear's level {module path: level}, and who chose them: "given"
    # (WeightSparsity.levels) or "search"; sparsify_weights applies them.
    weight_levels: dict[str, float] | None = None
    weight_levels_by: str = "given"
    # Linears calibrate on the first this many calibration batches (None: all); the search
    # sets its fitting batches, so the masks it verified on held-out batches are the ones applied.
    weight_calibration_batches: int | None = None
    # Per attention site (plan name): calibration statistics, written by `calibrate`.
    attention_stats: dict = field(default_factory=dict)
    pass_stats: dict = field(default_factory=dict)   # pass name -> its PassResult.stats


class Pass(Protocol):
    name: str

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult: ...


def _configure_logging(level: int) -> None:
    if level > 0 and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[sparsec] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class PassManager:
    def __init__(self, passes: list[Pass], dump: DumpWriter | None = None):
        self.passes = passes
        self.dump = dump
        self.debug = config.debug_level()
        _configure_logging(self.debug)

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
        if self.dump:
            self.dump.write_graph("input", gm, seconds=0.0, modified=False, decisions=None)
        for p in self.passes:
            start = time.perf_counter()
            result = p.run(gm, ctx)
            seconds = time.perf_counter() - start
            gm = result.graph_module
            ctx.pass_stats[p.name] = result.stats
            if self.debug >= 1:
                log.info("%-16s %7.3fs %s", p.name, seconds, "changed" if result.modified else "unchanged")
            if self.debug >= 2:
                log.info("  stats: %s", result.stats)
            if self.debug >= 3 and result.modified:
                log.info("%s", gm.code)
            if self.dump:
                decisions = result.decisions if result.decisions is not None else result.stats
                self.dump.write_graph(p.name, gm, seconds, result.modified, decisions)
        if self.dump:
            self.dump.write_plan(ctx.plan)
        return gm
