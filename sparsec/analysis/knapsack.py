"""Exact multiple-choice knapsack: one option per group, least total value, total weight
within a capacity.

The search allocates with it: groups are layers (or heads), options their
sparsity levels, and either value = predicted time, weight = sensitivity, capacity = the
error budget; or the dual, value = sensitivity, weight = time (or density). Groups are
generic, so other decisions (per-linear weight sparsity, say) can join the same knapsack as
extra groups.

Method: dynamic programming over Pareto frontiers (Kellerer, Pferschy, Pisinger, *Knapsack
Problems*, ch. 11). After each group only the (weight, value) states that no other state
beats in both are kept, with back-pointers, so the best final state is optimal for any real
weights, without discretising them. If a frontier outgrows ``max_states`` it is thinned to
one state per weight bucket: the answer is still feasible, and the Lagrangian bound (the LP
relaxation's value) says how far from optimal it can be. ``Solution.exact`` is True when
optimality is proven (no thinning, or the bound is met).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Hashable

import numpy as np

MAX_STATES = 20000


@dataclass(frozen=True)
class Option:
    weight: float                 # counts against the capacity
    value: float                  # minimised
    label: Hashable = None        # what a label limit counts (a pattern configuration, say)
    payload: Any = None           # carried along (e.g. the per-head choices of a layer option)


@dataclass
class Solution:
    choices: list[int]            # option index per group
    weight: float
    value: float
    exact: bool                   # optimality proven
    lower_bound: float            # no feasible choice has a smaller value
    largest_frontier: int         # most states kept after one group

    def to_dict(self) -> dict:
        return {"choices": self.choices, "weight": self.weight, "value": self.value, "exact": self.exact,
                "lower_bound": self.lower_bound, "largest_frontier": self.largest_frontier}


def _slack(capacity: float) -> float:
    # Sums of floats in another order may exceed an exactly-met capacity by rounding.
    return 1e-9 * max(1.0, abs(capacity)) if math.isfinite(capacity) else 0.0


@dataclass
class _Frontier:
    weights: np.ndarray           # ascending
    values: np.ndarray            # strictly descending
    back: list[tuple[np.ndarray, np.ndarray]]   # per group: previous state and option of each state
    thinned: bool
    largest: int

    def choices(self, state: int) -> list[int]:
        picked = []
        for previous, option in reversed(self.back):
            picked.append(int(option[state]))
            state = int(previous[state])
        return picked[::-1]


def _frontier(groups: list[list[Option]], capacity: float, max_states: int) -> _Frontier | None:
    """Pareto frontier of all feasible choices, or None when none is feasible."""
    weights, values = np.zeros(1), np.zeros(1)
    back, thinned, largest = [], False, 1
    limit = capacity + _slack(capacity)
    for options in groups:
        if not options:
            raise ValueError("every knapsack group needs at least one option")
        option_weights = np.array([o.weight for o in options], dtype=float)
        option_values = np.array([o.value for o in options], dtype=float)
        w = (weights[:, None] + option_weights[None, :]).ravel()
        v = (values[:, None] + option_values[None, :]).ravel()
        previous = np.repeat(np.arange(len(weights)), len(options))
        option = np.tile(np.arange(len(options)), len(weights))
        feasible = w <= limit
        if not feasible.any():
            return None
        w, v, previous, option = w[feasible], v[feasible], previous[feasible], option[feasible]
        order = np.lexsort((option, previous, v, w))        # by weight, then value; ties fixed
        w, v, previous, option = w[order], v[order], previous[order], option[order]
        lighter_best = np.minimum.accumulate(np.concatenate([[np.inf], v[:-1]]))
        keep = v < lighter_best                             # beats every lighter state
        w, v, previous, option = w[keep], v[keep], previous[keep], option[keep]
        if len(w) > max_states:
            # One state per weight bucket: the lightest-value (heaviest) state of each.
            step = (w[-1] - w[0]) / max_states or 1.0
            bucket = np.floor((w - w[0]) / step)
            last = np.concatenate([bucket[1:] != bucket[:-1], [True]])
            w, v, previous, option = w[last], v[last], previous[last], option[last]
            thinned = True
        largest = max(largest, len(w))
        weights, values = w, v
        back.append((previous, option))
    return _Frontier(weights, values, back, thinned, largest)


def lagrangian_bound(groups: list[list[Option]], capacity: float) -> float:
    """``max over l >= 0`` of ``sum_g min_i (v_i + l * w_i) - l * capacity``: a lower bound
    on every feasible choice's value (equal to the LP relaxation's optimum). The dual is
    concave and piecewise linear, so its maximum is at ``l = 0`` or at a slope between two
    options of one group; all of them are evaluated."""
    size = max(len(g) for g in groups)
    weights = np.full((len(groups), size), np.inf)
    values = np.full((len(groups), size), np.inf)
    for index, options in enumerate(groups):
        weights[index, :len(options)] = [o.weight for o in options]
        values[index, :len(options)] = [o.value for o in options]
    if not math.isfinite(capacity):
        return float(np.min(values, axis=1).sum())
    with np.errstate(invalid="ignore", divide="ignore"):      # padding: inf - inf
        dw = weights[:, None, :] - weights[:, :, None]
        dv = values[:, :, None] - values[:, None, :]
        slopes = dv / dw
    slopes = slopes[np.isfinite(slopes) & (slopes > 0) & (dw > 0)]
    multipliers = np.unique(np.concatenate([[0.0], slopes]))
    finite_w = np.where(np.isfinite(weights), weights, 0.0)
    best = -np.inf
    for chunk in np.array_split(multipliers, max(1, len(multipliers) // 256)):
        lagrangian = values[None] + chunk[:, None, None] * finite_w[None]
        dual = lagrangian.min(axis=2).sum(axis=1) - chunk * capacity
        best = max(best, float(dual.max()))
    return best


def solve(groups: list[list[Option]], capacity: float, max_states: int = MAX_STATES) -> Solution | None:
    """Choose one option per group minimising total value with total weight <= capacity.

    Returns None when even the lightest choice exceeds the capacity.
    """
    frontier = _frontier(groups, capacity, max_states)
    if frontier is None:
        return None
    choices = frontier.choices(len(frontier.values) - 1)    # least value: the last state
    weight = math.fsum(groups[g][c].weight for g, c in enumerate(choices))
    value = math.fsum(groups[g][c].value for g, c in enumerate(choices))
    bound = lagrangian_bound(groups, capacity)
    exact = not frontier.thinned or value <= bound + 1e-9 * max(1.0, abs(bound))
    return Solution(choices, weight, value, exact, bound, frontier.largest)


def limited_options(groups: list[list[Option]], max_labels: int, capacity: float = math.inf,
                    per_label_value: float = 0.0, max_states: int = MAX_STATES,
                    max_subsets: int = 4096) -> tuple[list[Option], bool]:
    """The Pareto set of choices (one option per group) that use at most ``max_labels``
    distinct labels, each as an :class:`Option` whose payload is the tuple of option
    indices; ``per_label_value`` is added once per label used (a launch, say).

    Every label subset of size ``<= max_labels`` is tried. When there are more than
    ``max_subsets`` of them, only the labels offered by the most groups take part and the
    second result, ``exact``, is False.
    """
    counts: dict[Hashable, int] = {}
    for options in groups:
        for label in {o.label for o in options}:
            counts[label] = counts.get(label, 0) + 1
    labels = sorted(counts, key=lambda label: (-counts[label], repr(label)))
    exact = True
    while len(labels) > max_labels and _subset_count(len(labels), max_labels) > max_subsets:
        labels, exact = labels[:-1], False
    states = []
    for size in range(1, min(max_labels, len(labels)) + 1):
        for subset in combinations(labels, size):
            allowed = [[i for i, o in enumerate(options) if o.label in subset] for options in groups]
            if not all(allowed):
                continue
            frontier = _frontier([[options[i] for i in keep] for options, keep in zip(groups, allowed)],
                                 capacity, max_states)
            if frontier is None:
                continue
            exact = exact and not frontier.thinned
            for state in range(len(frontier.values)):
                picked = tuple(keep[c] for keep, c in zip(allowed, frontier.choices(state)))
                states.append((float(frontier.weights[state]), float(frontier.values[state]) + per_label_value * size,
                               picked))
    states.sort(key=lambda s: (s[0], s[1], s[2]))
    options, best = [], math.inf
    for weight, value, picked in states:
        if value < best:
            options.append(Option(weight, value, payload=picked))
            best = value
    return options, exact


def _subset_count(labels: int, most: int) -> int:
    return sum(math.comb(labels, k) for k in range(1, most + 1))
