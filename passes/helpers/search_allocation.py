"""The search's knapsack: each layer's (or head's, or linear's) options, and the allocation
:mod:`sparsec.analysis.knapsack` chooses among them under the budget."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsec.ir.budget import Budget
from sparsec.analysis.cost_model import CostModel
from sparsec.analysis.knapsack import Option, limited_options, solve
from sparsec.ir.plan import AttentionSite

from sparsec.passes.helpers.search_ladder import Ladder, Rung, rung_groups
from sparsec.passes.helpers.search_linears import LinearItem, LinearLevel


@dataclass
class Choice:
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


@dataclass
class SearchedSite:
    """What the search knows of one attention site."""

    site: AttentionSite
    node: torch.fx.Node
    dense: Rung
    ladder: Ladder
    options: list          # layer mode: [Choice]; head mode: per head [Choice]
    dense_seconds: float   # the all-dense site, one launch

    def seconds(self, cost: CostModel, rungs, n: int) -> float:
        groups = [(g.pattern, g.params, len(g.heads)) for g in rung_groups(rungs)]
        return cost.site_seconds(groups, n, self.site.effective_causal(), self.site.head_dim)

    def levels_record(self, per_head: bool) -> list:
        """The sensitivity table rows of this site: per level, or per head and rung."""
        if per_head:
            return [[choice.record() | {"head": head} for choice in options]
                    for head, options in enumerate(self.options)]
        return [choice.record() for choice in self.options]


@dataclass
class Allocation:
    """The rungs each site runs, the level each linear takes, and the knapsack options that chose them."""

    rungs: dict[str, list[Rung]]
    picked: dict[str, list[Choice]]
    solver: dict
    linears: dict[str, LinearLevel] = field(default_factory=dict)

    def predicted(self, name: str) -> float:
        """The item's summed sensitivity (what the knapsack counted against the budget)."""
        if name in self.linears:
            return max(self.linears[name].sensitivity, 0.0)
        return sum(max(choice.sensitivity, 0.0) for choice in self.picked[name])

    def sparse(self) -> set[str]:
        """Names of the sparse attention sites and linears."""
        return ({name for name, rungs in self.rungs.items() if any(not r.is_dense for r in rungs)}
                | {name for name, option in self.linears.items() if option.level > 0})

    def densify(self, item: "SearchedSite | LinearItem") -> None:
        if isinstance(item, LinearItem):
            self.linears[item.name] = item.options[0]
            return
        self.rungs[item.site.name] = [item.dense] * item.site.num_heads
        self.picked[item.site.name] = []


def allocate(searched: list[SearchedSite], linears: list[LinearItem], budget: Budget, cost: CostModel) -> Allocation:
    """One knapsack group per layer (per head; per layer again under a pattern limit) and per linear."""
    def option(choice: Choice, label=None) -> Option:
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
    allocation = Allocation({s.site.name: [s.dense] * s.site.num_heads for s in searched},
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
