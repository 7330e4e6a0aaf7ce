"""The search's measurements: each option's sensitivity on the fitting batches, and the chosen
plan's error on the held-out batches with back-off (suffix runs of :mod:`.suffix_runs`)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from sparsec.ir.budget import Budget

from sparsec.passes.helpers.search_allocation import Allocation, SearchedSite
from sparsec.passes.helpers.search_ladder import rung_groups
from sparsec.passes.helpers.search_linears import LinearItem
from sparsec.passes.helpers.suffix_runs import SuffixRunner


def mean_error(runner: SuffixRunner, batches: list, overrides: dict, budget: Budget) -> float:
    if not overrides:
        return 0.0
    return sum(budget.measure(dense, runner.run(cache, overrides)) for cache, dense in batches) / len(batches)


def site_override(searched: SearchedSite, rungs) -> dict:
    return {} if all(r.is_dense for r in rungs) else {searched.node: rung_groups(rungs)}


def measure_sensitivity(searched: list[SearchedSite], linears: list[LinearItem], runner: SuffixRunner, fitting: list,
                        budget: Budget, progress: Callable) -> int:
    """Fill every option's sensitivity; returns the number of suffix runs. ``progress`` makes
    the progress bar (:meth:`CompileContext.progress`)."""
    jobs = []       # (option, its overrides: built when run, so one pruned weight is held at a time)
    for s in searched:
        dense = [s.dense] * s.site.num_heads
        if budget.per_head:
            for head, options in enumerate(s.options):
                for choice in options[1:]:
                    rungs = list(dense)
                    rungs[head] = choice.rungs[0]
                    jobs.append((choice, functools.partial(site_override, s, rungs)))
        else:
            jobs.extend((choice, functools.partial(site_override, s, choice.rungs)) for choice in s.options[1:])
    for item in linears:
        jobs.extend((option, functools.partial(item.override, option.level)) for option in item.options[1:])
    with progress(len(jobs) * len(fitting), "search: sensitivity", unit="run") as bar:
        for choice, overrides in jobs:
            choice.sensitivity = mean_error(runner, fitting, overrides(), budget)
            bar.update(len(fitting))
    return len(jobs) * len(fitting)


def verify_and_back_off(searched: list[SearchedSite], linears: list[LinearItem], allocation: Allocation, runner: SuffixRunner,
            held_out: list, budget: Budget) -> tuple[list[dict], float, dict[str, float]]:
    """Measure the plan on held-out batches; under ``max_error``, re-densify the layer or
    linear with the worst measured-over-predicted ratio until the measured error is within
    budget. Returns the back-off steps, the measured error and each sparse item's measured
    contribution (the error minus the error without it)."""
    by_name = {s.site.name: s for s in searched} | {item.name: item for item in linears}
    pruned: dict[str, torch.Tensor] = {}     # each sparse linear's weight at its chosen level

    def override(name: str) -> tuple[torch.fx.Node, Any]:
        item = by_name[name]
        if isinstance(item, LinearItem):
            if name not in pruned:
                pruned[name] = item.pruned(allocation.linears[name].level)
            return item.node, pruned[name]
        return item.node, rung_groups(allocation.rungs[name])

    def error_with(names: set[str]) -> float:
        return mean_error(runner, held_out, dict(override(name) for name in names), budget)

    sparse = allocation.sparse()
    steps = []
    measured = error_with(sparse)
    # A layer predicted harmless still gets a finite ratio.
    floor = 1e-3 * (budget.max_error or 0.0) + 1e-12
    while budget.mode == "error" and measured > budget.max_error and sparse:
        without = {name: error_with(sparse - {name}) for name in sorted(sparse)}
        ratios = {name: (measured - without[name]) / max(allocation.predicted(name), floor) for name in without}
        worst = max(sorted(ratios), key=lambda name: ratios[name])
        steps.append({"densified": worst, "kind": "linear" if worst in allocation.linears else "attention", "measured_before": measured, "measured_after": without[worst],
                      "predicted": allocation.predicted(worst), "ratio": ratios[worst]})
        allocation.densify(by_name[worst])
        sparse.discard(worst)
        measured = without[worst]
    contributions = {name: measured - error_with(sparse - {name}) for name in sorted(sparse)}
    return steps, measured, contributions
