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
3. **Allocation.** A multiple-choice knapsack (:mod:`sparsec.knapsack`, exact): one level
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
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from sparsec.budget import Budget
from sparsec.cost_model import CostModel
from sparsec.knapsack import Option, limited_options, solve
from sparsec.pass_manager import CompileContext, PassResult
from sparsec.patterns import get_pattern, instance_key, pattern_kinds
from sparsec.plan import AttentionSite, HeadGroup, SearchRecord, SiteSearchRecord

from .attention_sites import ATTENTION
from .search_linears import LinearItem, LinearLevel, analyze_linears, linear_items, searchable
from .suffix_runs import SuffixRunner


@dataclass(frozen=True)
class Rung:
    """One candidate of one head: a pattern instance and what it is predicted to cost."""

    pattern: str
    params: dict
    target: float                 # recall target it was fitted for (1.0: dense)
    recall: float | None          # recall on the calibration statistics, when known
    density: float                # fraction of the (causal) score matrix at seq_len
    seconds: float                # one head of one sequence at seq_len, launch excluded
    crossover: int | None = None  # shortest length from which it beats dense

    @property
    def key(self) -> str:
        """Equal keys mean one head group (:func:`sparsec.patterns.instance_key`)."""
        return instance_key(self.pattern, self.params)

    def to_dict(self) -> dict:
        return asdict(self)


# A ladder: per head, one rung per recall level (None: dense at that level).
Ladder = list[list["Rung | None"]]
LadderBuilder = Callable[[AttentionSite, CompileContext, tuple, CostModel, int], Ladder]


def dense_rung(site: AttentionSite, cost: CostModel, n: int) -> Rung:
    return Rung("dense", {}, 1.0, 1.0, 1.0, cost.head_seconds("dense", {}, n, site.effective_causal(), site.head_dim))


def fit_ladder(site: AttentionSite, ctx: CompileContext, levels: tuple, cost: CostModel, n: int) -> Ladder:
    """Per head and recall target, the cheapest fitted pattern faster than dense at ``n``."""
    stats = ctx.attention_stats.get(site.name)
    if stats is None:
        return [[None] * len(levels) for _ in site.heads]
    dense_seconds = dense_rung(site, cost, n).seconds
    causal = site.effective_causal()
    kinds = [kind for kind in pattern_kinds()
             if not (get_pattern(kind).computes_all or get_pattern(kind).computes_none)]
    ladder = []
    for head in range(site.num_heads):
        profiles = stats.head(head)
        rungs = []
        for target in levels:
            best = None                      # (seconds, kind, params, recall)
            for kind in kinds:
                try:
                    params, recall = get_pattern(kind).fit(profiles, target)
                except NotImplementedError:
                    continue
                seconds = cost.head_seconds(kind, params, n, causal, site.head_dim)
                if recall >= target - 1e-9 and seconds < dense_seconds and (best is None or seconds < best[0]):
                    best = (seconds, kind, params, recall)
            if best is None:
                rungs.append(None)
                continue
            seconds, kind, params, recall = best
            rungs.append(Rung(kind, params, target, recall, get_pattern(kind).density(params, n, causal),
                              seconds, cost.crossover_length(kind, params, causal, site.head_dim)))
        ladder.append(rungs)
    return ladder


# -- levels and options --------------------------------------------------------------------------

@dataclass
class _Choice:
    """One option of one knapsack group: a layer level, or one head's rung."""

    rungs: tuple            # the site's rung per head (dense where unchanged)
    level: int
    sensitivity: float = 0.0
    seconds: float = 0.0    # layer: site time with launches; head: the head's time
    density: float = 0.0    # share of the model's attention pairs

    def record(self) -> dict:
        return {"level": self.level, "sensitivity": self.sensitivity, "seconds": self.seconds,
                "density": self.density, "patterns": _pattern_counts(self.rungs)}


def _pattern_counts(rungs) -> dict:
    counts: dict[str, int] = {}
    for rung in rungs:
        counts[rung.pattern] = counts.get(rung.pattern, 0) + 1
    return counts


def _groups(rungs) -> list[HeadGroup]:
    groups: dict[str, HeadGroup] = {}
    for head, rung in enumerate(rungs):
        groups.setdefault(rung.key, HeadGroup(rung.pattern, rung.params, [])).heads.append(head)
    return list(groups.values())


def _limit_patterns(rungs: list[Rung], dense: Rung, limit: int | None) -> list[Rung]:
    """At most ``limit`` distinct instances: keep the ones most heads share, the rest dense."""
    keys = {rung.key for rung in rungs}
    if limit is None or len(keys) <= limit:
        return rungs
    shares = sorted(keys - {dense.key}, key=lambda k: (-sum(r.key == k for r in rungs), k))
    kept = set(shares[:limit - 1])
    return [rung if rung.key in kept else dense for rung in rungs]


@dataclass
class _Site:
    """What the search knows of one attention site."""

    site: AttentionSite
    node: torch.fx.Node
    dense: Rung
    ladder: Ladder
    options: list          # layer mode: [_Choice]; head mode: per head [_Choice]
    dense_seconds: float   # the all-dense site, one launch

    def seconds(self, cost: CostModel, rungs, n: int) -> float:
        groups = [(g.pattern, g.params, len(g.heads)) for g in _groups(rungs)]
        return cost.site_seconds(groups, n, self.site.effective_causal(), self.site.head_dim)

    def levels_record(self, per_head: bool) -> list:
        """The sensitivity table rows of this site: per level, or per head and rung."""
        if per_head:
            return [[choice.record() | {"head": head} for choice in options]
                    for head, options in enumerate(self.options)]
        return [choice.record() for choice in self.options]


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
        linear_nodes = [nodes[e["node"]] for e in ctx.plan.linears if not e["reason"]] if analysis else []
        if not sites and not linear_nodes:
            return PassResult(gm, False, {"sites": 0})
        runner = SuffixRunner(gm, [nodes[s.node] for s in sites] + linear_nodes)
        fitting = [runner.dense(call) for call in fitting_calls]
        held_out = [runner.dense(call) for call in held_out_calls] if held_out_calls else fitting
        n = budget.seq_len or _sequence_length([nodes[s.node] for s in sites], linear_nodes, fitting)
        total_heads = sum(site.num_heads for site in sites)
        searched = [self._site(site, nodes[site.node], ctx, budget, cost, n, total_heads) for site in sites]
        linears = linear_items(gm, ctx, analysis, cost, n) if analysis else []

        runs = _measure_sensitivity(searched, linears, runner, fitting, budget)
        allocation = _allocate(searched, linears, budget, cost)
        backoff, measured, contributions = _verify(searched, linears, allocation, runner, held_out, budget)
        record = _write_plan(ctx, searched, linears, allocation, backoff, measured, contributions, budget, cost, n,
                             held_out_batches=len(held_out_calls))
        if not allocation.sparse():
            record.all_dense_reason = _all_dense_reason(searched, budget, backoff, n)
            warnings.warn(f"sparsec: the search kept every layer dense: {record.all_dense_reason}", stacklevel=2)
        table = [{"site": s.site.name, "layer": s.site.layer, "levels": s.levels_record(budget.per_head)}
                 for s in searched]
        table += [{"linear": item.name, "levels": [option.record() for option in item.options]} for item in linears]
        sparse = allocation.sparse()
        stats = {"sites": len(searched), "sites_sparse": len(sparse & allocation.rungs.keys()),
                 "heads_sparse": sum(r.pattern != "dense" for rungs in allocation.rungs.values() for r in rungs),
                 "linears_searched": len(linears), "linears_sparse": len(sparse & allocation.linears.keys()),
                 "suffix_runs": runs, "backoff_steps": len(backoff),
                 "predicted_speedup": record.predicted_speedup, "measured_error": measured}
        return PassResult(gm, False, stats, {"sensitivity": table, "allocation": record.to_dict()})

    def _site(self, site, node, ctx, budget, cost, n, total_heads) -> _Site:
        dense = dense_rung(site, cost, n)
        ladder = self.ladder(site, ctx, tuple(budget.recall_levels), cost, n)
        searched = _Site(site, node, dense, ladder, [], 0.0)
        searched.dense_seconds = searched.seconds(cost, [dense] * site.num_heads, n)
        share = site.num_heads / total_heads          # of the model's attention pairs
        if budget.per_head:
            for head, rungs in enumerate(ladder):
                options, seen = [_Choice((dense,), 0, 0.0, dense.seconds, share / site.num_heads)], {dense.key}
                for level, rung in enumerate(rungs, start=1):
                    if rung is not None and rung.key not in seen:
                        seen.add(rung.key)
                        options.append(_Choice((rung,), level, 0.0, rung.seconds,
                                               rung.density * share / site.num_heads))
                searched.options.append(options)
            return searched
        seen = set()
        for level in range(len(budget.recall_levels) + 1):
            rungs = [dense] * site.num_heads if level == 0 else \
                [ladder[h][level - 1] or dense for h in range(site.num_heads)]
            rungs = tuple(_limit_patterns(rungs, dense, budget.max_patterns_per_layer))
            seconds = searched.seconds(cost, rungs, n)
            keys = tuple(r.key for r in rungs)
            if keys in seen or (level > 0 and seconds >= searched.dense_seconds):
                continue
            seen.add(keys)
            density = sum(r.density for r in rungs) / site.num_heads * share
            searched.options.append(_Choice(rungs, level, 0.0, seconds, density))
        return searched


def _all_dense_reason(searched: list[_Site], budget: Budget, backoff: list, n: int) -> str:
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


def _mean_error(runner: SuffixRunner, batches: list, overrides: dict, budget: Budget) -> float:
    if not overrides:
        return 0.0
    return sum(budget.measure(dense, runner.run(cache, overrides)) for cache, dense in batches) / len(batches)


def _site_override(searched: _Site, rungs) -> dict:
    return {} if all(r.pattern == "dense" for r in rungs) else {searched.node: _groups(rungs)}


def _measure_sensitivity(searched: list[_Site], linears: list[LinearItem], runner: SuffixRunner, fitting: list,
                         budget: Budget) -> int:
    """Fill every option's sensitivity; returns the number of suffix runs."""
    jobs = []       # (option, its overrides: built when run, so one pruned weight is held at a time)
    for s in searched:
        dense = [s.dense] * s.site.num_heads
        if budget.per_head:
            for head, options in enumerate(s.options):
                for choice in options[1:]:
                    rungs = list(dense)
                    rungs[head] = choice.rungs[0]
                    jobs.append((choice, functools.partial(_site_override, s, rungs)))
        else:
            jobs.extend((choice, functools.partial(_site_override, s, choice.rungs)) for choice in s.options[1:])
    for item in linears:
        jobs.extend((option, functools.partial(item.override, option.level)) for option in item.options[1:])
    with tqdm(total=len(jobs) * len(fitting), desc="sparsec search: sensitivity", unit="run",
              disable=None) as progress:
        for choice, overrides in jobs:
            choice.sensitivity = _mean_error(runner, fitting, overrides(), budget)
            progress.update(len(fitting))
    return len(jobs) * len(fitting)


@dataclass
class _Allocation:
    """The rungs each site runs, the level each linear takes, and the knapsack options that chose them."""

    rungs: dict[str, list[Rung]]
    picked: dict[str, list[_Choice]]
    solver: dict
    linears: dict[str, LinearLevel] = field(default_factory=dict)

    def predicted(self, name: str) -> float:
        """The item's summed sensitivity (what the knapsack counted against the budget)."""
        if name in self.linears:
            return max(self.linears[name].sensitivity, 0.0)
        return sum(max(choice.sensitivity, 0.0) for choice in self.picked[name])

    def sparse(self) -> set[str]:
        """Names of the sparse attention sites and linears."""
        return ({name for name, rungs in self.rungs.items() if any(r.pattern != "dense" for r in rungs)}
                | {name for name, option in self.linears.items() if option.level > 0})

    def densify(self, item: "_Site | LinearItem") -> None:
        if isinstance(item, LinearItem):
            self.linears[item.name] = item.options[0]
            return
        self.rungs[item.site.name] = [item.dense] * item.site.num_heads
        self.picked[item.site.name] = []


def _allocate(searched: list[_Site], linears: list[LinearItem], budget: Budget, cost: CostModel) -> _Allocation:
    """One knapsack group per layer (per head; per layer again under a pattern limit) and per linear."""
    def option(choice: _Choice, label=None) -> Option:
        error = max(choice.sensitivity, 0.0)        # a level that seems to help counts as harmless
        if budget.mode == "error":
            return Option(error, choice.seconds, label, [choice])
        return Option(choice.seconds if budget.mode == "speedup" else choice.density, error, label, [choice])

    groups, owners, layers_exact = [], [], True
    for s in searched:
        if not budget.per_head:
            groups.append([option(c) for c in s.options])
            owners.append(s)
        elif budget.max_patterns_per_layer is not None:
            heads = [[option(c, c.rungs[0].key) for c in head] for head in s.options]
            # Each distinct pattern is a launch: charge it where time is the minimised value.
            per_pattern = cost.profile.sparse.launch_us * 1e-6 if budget.mode == "error" else 0.0
            layer, exact = limited_options(heads, budget.max_patterns_per_layer, per_label_value=per_pattern)
            layers_exact = layers_exact and exact
            groups.append([Option(o.weight, o.value, None, [heads[h][c].payload[0] for h, c in enumerate(o.payload)])
                           for o in layer])
            owners.append(s)
        else:
            groups.extend([option(c) for c in head] for head in s.options)
            owners.extend([s] * len(s.options))
    for item in linears:
        groups.append([option(level) for level in item.options])
        owners.append(item)
    dense_total = sum(s.dense_seconds for s in searched) + sum(item.dense_seconds for item in linears)
    capacity = {"error": budget.max_error, "speedup": dense_total / (budget.target_speedup or 1.0),
                "density": budget.max_density}[budget.mode]
    solution = solve(groups, capacity)
    if solution is None:
        # The cap cannot be met: the lightest option everywhere, and the record says so.
        choices = [min(range(len(g)), key=lambda i, g=g: (g[i].weight, g[i].value)) for g in groups]
        solver = {"feasible": False, "choices": choices}
    else:
        choices, solver = solution.choices, {"feasible": True} | solution.to_dict()
        solver["exact"] = solution.exact and layers_exact
    solver["capacity"] = capacity
    allocation = _Allocation({s.site.name: [s.dense] * s.site.num_heads for s in searched},
                             {s.site.name: [] for s in searched}, solver)
    for owner, group, choice in zip(owners, groups, choices):
        if isinstance(owner, LinearItem):
            allocation.linears[owner.name] = group[choice].payload[0]
        else:
            allocation.picked[owner.site.name].extend(group[choice].payload)
    for s in searched:
        picked = allocation.picked[s.site.name]
        if budget.per_head:
            allocation.rungs[s.site.name] = [choice.rungs[0] for choice in picked]
        else:
            allocation.rungs[s.site.name] = list(picked[0].rungs)
    return allocation


def _verify(searched: list[_Site], linears: list[LinearItem], allocation: _Allocation, runner: SuffixRunner,
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
        return item.node, _groups(allocation.rungs[name])

    def error_with(names: set[str]) -> float:
        return _mean_error(runner, held_out, dict(override(name) for name in names), budget)

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


def _write_plan(ctx: CompileContext, searched: list[_Site], linears: list[LinearItem], allocation: _Allocation,
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
            if rung.pattern != "dense":
                reason = f"search: recall level {rung.target}"
            elif any(r is not None for r in s.ladder[head.head]):
                reason = ("search: made dense again, measured error over budget" if name in densified
                          else "search: kept dense within the budget")
            else:
                reason = f"search: no candidate faster than dense at length {n}"
            head.assign(rung.pattern, rung.params, reason)
            head.density = rung.density
            head.recall = rung.recall if rung.pattern != "dense" else 1.0
        s.site.regroup()
        s.site.search = SiteSearchRecord(
            levels=s.levels_record(budget.per_head),
            ladder=[[r.to_dict() if r else None for r in head] for head in s.ladder],
            chosen_level=max((c.level for c in allocation.picked[name]), default=0),
            chosen_recall=min((r.target for r in rungs if r.pattern != "dense"), default=1.0),
            sensitivity=allocation.predicted(name), measured_contribution=contributions.get(name),
            seconds=seconds, dense_seconds=s.dense_seconds, densified_by_backoff=name in densified)
    linear_total = linear_dense = 0.0
    for item in linears:
        chosen = allocation.linears[item.name]
        linear_total += chosen.seconds
        linear_dense += item.dense_seconds
        item.entry["level"], item.entry["allocated_by"] = chosen.level, "search"
        item.entry["search"] = {
            "level": chosen.level, "predicted_error": allocation.predicted(item.name),
            "measured_error": contributions.get(item.name), "seconds": chosen.seconds,
            "dense_seconds": item.dense_seconds, "speedup": chosen.speedup, "lowering": chosen.why,
            "levels": [option.record() for option in item.options], "densified_by_backoff": item.name in densified}
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
