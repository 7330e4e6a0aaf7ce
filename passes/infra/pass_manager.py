"""Passes, their context and the manager that runs them.

A pass is an object with a ``name`` and ``run(gm, ctx) -> PassResult``. Instruments stay
out of pass logic (TVM's ``tvm.ir.instrument``): the manager skips passes disabled by name,
times every pass, lints and recompiles the graph of a pass that reports ``modified``, logs,
dumps, and hands passes their progress bars (:meth:`CompileContext.progress`); extra
:class:`PassInstrument` objects see every pass before and after it runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch.fx
from tqdm.auto import tqdm

from sparsec.ir import config
from sparsec.passes.infra.dump import DumpWriter
from sparsec.ir.plan import Plan
from sparsec.ir.targets import Target

if TYPE_CHECKING:
    from sparsec.analysis.linear_sensitivity import LinearAnalysis
    from sparsec.ir.budget import Budget
    from sparsec.weights.config import WeightSparsity

log = logging.getLogger("sparsec")

# Progress bars only for work of at least this many steps.
PROGRESS_MIN_STEPS = 16


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
    # The linears' calibration, recorded once: by the search when it prices linears, else by
    # sparsify_weights, which reuses it while it is current (LinearAnalysis.is_current).
    linear_analysis: LinearAnalysis | None = None
    # Per attention site (plan name): calibration statistics, written by `calibrate`.
    attention_stats: dict = field(default_factory=dict)
    # Calibrate's dense run of each calibration batch, ``(values crossing any attention
    # site, output)``, kept for verify when it measures on the calibration batches (one
    # forward per batch fewer); verify drops them. Valid across passes that change no value
    # (fold_causal_mask's rewrites are exact); a runner whose crossing values they do not
    # cover runs its own (SuffixRunner.dense_runs).
    dense_runs: list | None = None
    pass_stats: dict = field(default_factory=dict)   # pass name -> its PassResult.stats

    def serving_length(self, site_name: str) -> int:
        """The length a site's costs are predicted at: ``seq_len``, else the site's longest
        calibration length (0 when it has no statistics)."""
        stats = self.attention_stats.get(site_name)
        return self.seq_len or (max(stats.lengths) if stats and stats.profiles else 0)

    def progress(self, total: int, description: str, unit: str = "step") -> tqdm:
        """A progress bar for the work inside a pass (calibration batches, search runs), shown
        on a terminal for at least ``PROGRESS_MIN_STEPS`` steps; use it as a context manager
        and ``update(n)`` it."""
        return tqdm(total=total, desc=f"sparsec {description}", unit=unit,
                    disable=True if total < PROGRESS_MIN_STEPS else None)


class Pass(Protocol):
    name: str

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult: ...


def _configure_logging(level: int) -> None:
    if level > 0 and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[sparsec] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


class PassInstrument(Protocol):
    """Sees every pass the manager runs (TVM's ``PassInstrument``): before it, and after it
    with its result, its time and the graph already linted and recompiled."""

    def before_pass(self, name: str, gm: torch.fx.GraphModule, ctx: CompileContext) -> None: ...

    def after_pass(self, name: str, result: PassResult, seconds: float, ctx: CompileContext) -> None: ...


class PassTimer:
    """An instrument that sums each pass's seconds by name (``timer.seconds``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def before_pass(self, name: str, gm: torch.fx.GraphModule, ctx: CompileContext) -> None:
        pass

    def after_pass(self, name: str, result: PassResult, seconds: float, ctx: CompileContext) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


class PassManager:
    """Runs ``passes`` in order with the instruments of the module docstring.

    ``disabled`` names passes to skip, with those of ``SPARSEC_DISABLE_PASSES``
    (:func:`sparsec.ir.config.disabled_passes`); each skipped pass is listed in
    ``plan.extra["disabled_passes"]``, and the dump has an entry saying so. ``instruments``
    run after the manager's own, in order.
    """

    def __init__(self, passes: list[Pass], dump: DumpWriter | None = None, disabled: tuple[str, ...] = (),
                 instruments: tuple[PassInstrument, ...] = ()):
        self.passes = passes
        self.dump = dump
        self.disabled = frozenset(disabled) | config.disabled_passes()
        unknown = self.disabled - {p.name for p in passes}
        if unknown:
            raise ValueError(f"cannot disable {sorted(unknown)}: the pipeline's passes are "
                             f"{[p.name for p in passes]}")
        self.instruments = instruments
        self.debug = config.debug_level()
        _configure_logging(self.debug)

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
        if self.dump:
            self.dump.write_graph("input", gm, seconds=0.0, modified=False, decisions=None)
        for p in self.passes:
            if p.name in self.disabled:
                self._skip(p.name, gm, ctx)
                continue
            for instrument in self.instruments:
                instrument.before_pass(p.name, gm, ctx)
            start = time.perf_counter()
            result = p.run(gm, ctx)
            gm = result.graph_module
            if result.modified:
                gm.graph.lint()
                gm.recompile()
            seconds = time.perf_counter() - start
            ctx.pass_stats[p.name] = result.stats
            self._log(p.name, result, seconds, gm)
            if self.dump:
                decisions = result.decisions if result.decisions is not None else result.stats
                self.dump.write_graph(p.name, gm, seconds, result.modified, decisions)
            for instrument in self.instruments:
                instrument.after_pass(p.name, result, seconds, ctx)
        if self.dump:
            self.dump.write_plan(ctx.plan)
        return gm

    def _skip(self, name: str, gm: torch.fx.GraphModule, ctx: CompileContext) -> None:
        ctx.plan.extra.setdefault("disabled_passes", []).append(name)
        ctx.pass_stats[name] = {"disabled": True}
        if self.debug >= 1:
            log.info("%-16s disabled", name)
        if self.dump:
            self.dump.write_graph(name, gm, 0.0, False, {"skipped": "disabled by name (SPARSEC_DISABLE_PASSES "
                                                                    "or PassManager(disabled=...))"})

    def _log(self, name: str, result: PassResult, seconds: float, gm: torch.fx.GraphModule) -> None:
        if self.debug >= 1:
            log.info("%-16s %7.3fs %s", name, seconds, "changed" if result.modified else "unchanged")
        if self.debug >= 2:
            log.info("  stats: %s", result.stats)
        if self.debug >= 3 and result.modified:
            log.info("%s", gm.code)
