"""search: how sparse each attention layer (or head) goes, under one global budget.

Classification says which patterns each head could take; the search decides how far to go,
layer by layer, so that the whole model stays within the user's :class:`~sparsec.Budget`.

1. **Ladder.** Per head, for each recall target of the budget (0.99, 0.98, ... by default),
   the cheapest pattern whose fit (``Pattern.fit`` on the calibration statistics) reaches
   it, timed by the target's cost model at ``seq_len``. A candidate predicted slower than
   dense there (below its crossover length) is dropped: that head stays dense at that rung.
   Level ``l`` of a layer puts every head at its rung ``l``; level 0 is dense.
2. **Sensitivity.** The end-to-end metric when only that layer (``per_head``: only that
   head) takes a level, on the calibration batches that are not held out. The dense run's
   activations are cached and only the graph suffix from the layer on is re-run.
3. **Allocation.** A multiple-choice knapsack (:mod:`sparsec.analysis.knapsack`, exact): one level
   per layer (per head) minimising predicted time with summed sensitivity within
   ``max_error``; or the dual, least summed sensitivity under a time (``target_speedup``)
   or density (``max_density``) cap. ``max_patterns_per_layer`` bounds the distinct
   patterns, hence launches, of a layer.
4. **Verification and back-off.** Sensitivities do not add exactly: the chosen plan runs on
   the held-out batches; while the measured error exceeds ``max_error``, the sparse layer
   whose measured contribution (error with it minus error without it) is largest relative
   to its predicted sensitivity is made dense again. Each sparse item's measured contribution
   (error of the plan minus error without it) is then recorded.

**Linears** (weight sparsity): when ``sparsify_weights`` options ask for weight
sparsity (``sparsec.WeightSparsity``) under an error or speedup budget, every eligible linear
joins the knapsack as one more group (:mod:`.search_linears`): its candidate levels, timed
by :meth:`CostModel.linear_speedup` at ``seq_len`` tokens, with the end-to-end sensitivity
of pruning that linear alone (suffix runs from the linear, its weight replaced by the
pruned one). Back-off re-densifies attention layers and linears alike, and a
``target_speedup`` then counts attention and linear time together. The search writes the
chosen levels to ``ctx.weight_levels`` and each linear's ``search`` record to
its plan entry; ``sparsify_weights``, after ``fuse_heads``, applies them. Scores are
calibrated on the fitting batches only, so held-out batches stay held out.

The plan gets each head's pattern and ``site.search`` (levels with sensitivity and
time, the ladder, the chosen level); ``plan.search`` holds the budget, predicted and
measured error, predicted speedup, the solver's choices and the back-off steps. The
sensitivity table and the allocation are the pass's dump decisions.

Cost of the search: one dense run per calibration batch, then ``levels`` suffix runs per
layer and fitting batch (``heads x levels`` with ``per_head``; plus ``levels`` per linear),
then ``sparse items + 1`` held-out runs per back-off step and ``sparse items`` for the
contributions; a progress bar shows on a terminal. The cache holds, per
batch, every value that crosses an attention site or a searched linear (the residual stream
before each layer, normalised inputs of the projections, rotary tables, masks), not every
activation.

This module holds the pass and its plan writing; the ladder is :mod:`.search_ladder`, the
knapsack options and allocation :mod:`.search_allocation`, the sensitivity runs and the
held-out back-off :mod:`.search_measure`, the linears :mod:`.search_linears`.
"""
from __future__ import annotations

import math
import warnings

import torch

from sparsec.ir.budget import Budget
from sparsec.analysis.cost_model import CostModel
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.ir.plan import LinearSearchRecord, SearchRecord, SiteSearchRecord

from sparsec.passes.helpers.attention_sites import ATTENTION
from sparsec.passes.helpers.search_allocation import Allocation, Choice, SearchedSite, allocate
from sparsec.passes.helpers.search_ladder import LadderBuilder, dense_rung, fit_ladder, limit_patterns
from sparsec.passes.helpers.search_linears import LinearItem, analyze_linears, linear_items, searchable
from sparsec.passes.helpers.search_measure import measure_sensitivity, verify_and_back_off
from sparsec.passes.helpers.suffix_runs import SuffixRunner


class Search:
    """The search pass. ``budget`` defaults to ``ctx.budget``; ``ladder`` builds
    each site's candidates (default :func:`fit_ladder`)."""

    name = "search"

    def __init__(self, budget: Budget | None = None, ladder: LadderBuilder | None = None):
        self.budget = budget
        self.ladder = ladder or fit_ladder

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        budget = self.budget or ctx.budget
        if budget is None:
            raise ValueError("the search pass needs a budget: Search(Budget(...)) or ctx.budget")
        cost = CostModel(ctx.target)
        nodes = {node.name: node for node in gm.graph.nodes}
        sites = [s for s in ctx.plan.attention if s.node in nodes and nodes[s.node].target == ATTENTION]
        fitting_calls, held_out_calls = _split(ctx.calibration or [(ctx.example_args, ctx.example_kwargs)],
                                               budget.held_out)
        analysis = analyze_linears(gm, ctx, len(fitting_calls)) if searchable(ctx, budget.mode) else None
        linear_nodes = [nodes[e.node] for e in ctx.plan.linears if e.eligible] if analysis else []
        if not sites and not linear_nodes:
            return PassResult(gm, False, {"sites": 0})
        runner = SuffixRunner(gm, [nodes[s.node] for s in sites] + linear_nodes)
        fitting = [runner.dense(call) for call in fitting_calls]
        held_out = [runner.dense(call) for call in held_out_calls] if held_out_calls else fitting
        n = budget.seq_len or _sequence_length([nodes[s.node] for s in sites], linear_nodes, fitting)
        total_heads = sum(site.num_heads for site in sites)
        searched = [self._site(site, nodes[site.node], ctx, budget, cost, n, total_heads) for site in sites]
        linears = linear_items(gm, ctx, analysis, cost, n) if analysis else []

        runs = measure_sensitivity(searched, linears, runner, fitting, budget, ctx.progress)
        allocation = allocate(searched, linears, budget, cost)
        backoff, measured, contributions = verify_and_back_off(searched, linears, allocation, runner, held_out, budget)
        record = _write_plan(ctx, searched, linears, allocation, backoff, measured, contributions, budget, cost, n,
                             held_out_batches=len(held_out_calls))
        sparse = allocation.sparse()
        if not sparse:
            record.all_dense_reason = _all_dense_reason(searched, budget, backoff, n)
            warnings.warn(f"sparsec: the search kept every layer dense: {record.all_dense_reason}", stacklevel=2)
        # The decisions dump: each site's and linear's levels, as the plan records them.
        table = [{"site": s.site.name, "layer": s.site.layer, "levels": s.site.search.levels} for s in searched]
        table += [{"linear": item.name, "levels": item.entry.search.levels} for item in linears]
        stats = {"sites": len(searched), "sites_sparse": len(sparse & allocation.rungs.keys()),
                 "heads_sparse": sum(not r.is_dense for rungs in allocation.rungs.values() for r in rungs),
                 "linears_searched": len(linears), "linears_sparse": len(sparse & allocation.linears.keys()),
                 "suffix_runs": runs, "backoff_steps": len(backoff),
                 "predicted_speedup": record.predicted_speedup, "measured_error": measured}
        return PassResult(gm, False, stats, {"sensitivity": table, "allocation": record.to_dict()})

    def _site(self, site, node, ctx, budget, cost, n, total_heads) -> SearchedSite:
        dense = dense_rung(site, cost, n)
        ladder = self.ladder(site, ctx, tuple(budget.recall_levels), cost, n)
        searched = SearchedSite(site, node, dense, ladder, [], 0.0)
        searched.dense_seconds = searched.seconds(cost, [dense] * site.num_heads, n)
        share = site.num_heads / total_heads          # of the model's attention pairs
        if budget.per_head:
            for head, rungs in enumerate(ladder):
                options, seen = [Choice((dense,), 0, 0.0, dense.seconds, share / site.num_heads)], {dense.key}
                for level, rung in enumerate(rungs, start=1):
                    if rung is not None and rung.key not in seen:
                        seen.add(rung.key)
                        options.append(Choice((rung,), level, 0.0, rung.seconds,
                                               rung.density * share / site.num_heads))
                searched.options.append(options)
            return searched
        seen = set()
        for level in range(len(budget.recall_levels) + 1):
            rungs = [dense] * site.num_heads if level == 0 else \
                [ladder[h][level - 1] or dense for h in range(site.num_heads)]
            rungs = tuple(limit_patterns(rungs, dense, budget.max_patterns_per_layer))
            seconds = searched.seconds(cost, rungs, n)
            keys = tuple(r.key for r in rungs)
            if keys in seen or (level > 0 and seconds >= searched.dense_seconds):
                continue
            seen.add(keys)
            density = sum(r.density for r in rungs) / site.num_heads * share
            searched.options.append(Choice(rungs, level, 0.0, seconds, density))
        return searched


def _all_dense_reason(searched: list[SearchedSite], budget: Budget, backoff: list, n: int) -> str:
    """Which constraint kept every layer dense, and what would change that."""
    if backoff:
        return (f"the chosen plan measured over max_error={budget.max_error} on held-out batches and back-off "
                f"undid all {len(backoff)} sparse items; raise max_error or calibrate on more batches")
    candidates = sum(r is not None for s in searched for head in s.ladder for r in head)
    if not candidates:
        return (f"no head has a pattern predicted faster than dense at N={n} on the target; set "
                f"Budget(seq_len=...) to the serving length (sparse patterns pay off at longer N)")
    levels = [choice for s in searched for options in ([s.options] if not budget.per_head else s.options)
              for choice in options[1:]]
    if not levels:
        distinct = max(len({r.key for head in s.ladder for r in head if r is not None}) for s in searched)
        return (f"{candidates} head candidates exist, but no layer level is predicted faster than the dense "
                f"layer at N={n}: each distinct pattern is a launch (up to {distinct} in a layer); try "
                f"Budget(max_patterns_per_layer=2), per_head=True, or a longer seq_len")
    lightest = min(levels, key=lambda c: c.sensitivity)
    if budget.mode == "error":
        return (f"the least sensitive sparse level costs {lightest.sensitivity:.3g} in {budget.metric_name}, "
                f"over max_error={budget.max_error}; raise max_error or add recall levels nearer 1")
    return f"the solver found no sparse level within the {budget.mode} cap"


def _split(calls: list, held_out: int | None) -> tuple[list, list]:
    """Fitting and held-out calibration batches (no held-out ones when there is one batch)."""
    if held_out is None:
        held_out = max(1, round(len(calls) / 3)) if len(calls) >= 2 else 0
    held_out = min(held_out, len(calls) - 1)
    return calls[:len(calls) - held_out], calls[len(calls) - held_out:]


def _sequence_length(site_nodes: list, linear_nodes: list, batches: list) -> int:
    """The longest key length at any site; without sites, the longest linear input (``[..., N, in]``)."""
    if site_nodes:
        return max(int(cache[node.args[1]].shape[-2]) for node in site_nodes for cache, _ in batches)
    return max(int(cache[node.args[0]].shape[-2 if cache[node.args[0]].dim() > 2 else 0])
               for node in linear_nodes for cache, _ in batches)


def _write_plan(ctx: CompileContext, searched: list[SearchedSite], linears: list[LinearItem], allocation: Allocation,
                backoff: list, measured: float, contributions: dict[str, float], budget: Budget, cost: CostModel,
                n: int, held_out_batches: int) -> SearchRecord:
    attention_dense = sum(s.dense_seconds for s in searched)
    attention_total = 0.0
    densified = {step["densified"] for step in backoff}
    for s in searched:
        name, rungs = s.site.name, allocation.rungs[s.site.name]
        seconds = s.seconds(cost, rungs, n)
        attention_total += seconds
        for head, rung in zip(s.site.heads, rungs):
            if not rung.is_dense:
                reason = f"search: recall level {rung.target}"
            elif any(r is not None for r in s.ladder[head.head]):
                reason = ("search: made dense again, measured error over budget" if name in densified
                          else "search: kept dense within the budget")
            else:
                reason = f"search: no candidate faster than dense at length {n}"
            head.assign(rung.pattern, rung.params, reason)
            head.density = rung.density
            head.recall = rung.recall if not rung.is_dense else 1.0
        s.site.regroup()
        s.site.search = SiteSearchRecord(
            levels=s.levels_record(budget.per_head),
            ladder=[[r.to_dict() if r else None for r in head] for head in s.ladder],
            chosen_level=max((c.level for c in allocation.picked[name]), default=0),
            chosen_recall=min((r.target for r in rungs if not r.is_dense), default=1.0),
            sensitivity=allocation.predicted(name), measured_contribution=contributions.get(name),
            seconds=seconds, dense_seconds=s.dense_seconds, densified_by_backoff=name in densified)
    linear_total = linear_dense = 0.0
    for item in linears:
        chosen = allocation.linears[item.name]
        linear_total += chosen.seconds
        linear_dense += item.dense_seconds
        item.entry.level, item.entry.allocated_by = chosen.level, "search"
        item.entry.search = LinearSearchRecord(
            level=chosen.level, predicted_error=allocation.predicted(item.name),
            measured_error=contributions.get(item.name), seconds=chosen.seconds,
            dense_seconds=item.dense_seconds, speedup=chosen.speedup, lowering=chosen.why,
            levels=[option.record() for option in item.options], densified_by_backoff=item.name in densified)
    if linears:
        # sparsify_weights applies these after fuse_heads (every searched linear, dense ones at 0).
        ctx.weight_levels = {item.name: allocation.linears[item.name].level for item in linears}
        ctx.weight_levels_by = "search"
    total, dense_total = attention_total + linear_total, attention_dense + linear_dense
    record = SearchRecord(
        budget=budget.to_dict(), mode=budget.mode, seq_len=n, target=cost.target.name,
        cost_profile=cost.profile.to_dict(),
        predicted_error=sum(allocation.predicted(name)
                            for name in [s.site.name for s in searched] + [i.name for i in linears]),
        measured_error=measured, held_out_batches=held_out_batches,
        predicted_seconds=total, dense_seconds=dense_total,
        predicted_speedup=dense_total / total if total > 0 else math.inf,
        attention_seconds=attention_total, attention_dense_seconds=attention_dense,
        linears={"searched": len(linears), "sparse": sum(allocation.linears[i.name].level > 0 for i in linears),
                 "seconds": linear_total, "dense_seconds": linear_dense},
        solver=allocation.solver, backoff=backoff,
        within_budget=budget.mode != "error" or measured <= budget.max_error)
    ctx.plan.search = record
    return record
