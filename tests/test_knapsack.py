"""The multiple-choice knapsack solver against brute force."""
import itertools
import math
import random

import pytest

from sparsec.analysis.knapsack import Option, lagrangian_bound, limited_options, solve


def random_groups(rng, groups, options, labels=3):
    return [[Option(rng.choice([0.0, rng.random()]), rng.random() * 10, rng.randrange(labels))
             for _ in range(rng.randint(1, options))] for _ in range(groups)]


def brute_force(groups, capacity, max_labels=None, per_label_value=0.0):
    best = None
    for combo in itertools.product(*[range(len(g)) for g in groups]):
        picked = [groups[g][c] for g, c in enumerate(combo)]
        labels = {o.label for o in picked}
        if max_labels is not None and len(labels) > max_labels:
            continue
        weight = sum(o.weight for o in picked)
        value = sum(o.value for o in picked) + per_label_value * (len(labels) if max_labels else 0)
        if weight <= capacity + 1e-12 and (best is None or value < best):
            best = value
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = random_groups(rng, rng.randint(1, 6), 5)
    capacity = rng.random() * len(groups) * 0.6
    expected = brute_force(groups, capacity)
    solution = solve(groups, capacity)
    if expected is None:
        assert solution is None
        return
    assert solution.value == pytest.approx(expected, abs=1e-9)
    assert solution.exact and solution.weight <= capacity + 1e-9
    assert solution.lower_bound <= expected + 1e-9
    assert solution.value == pytest.approx(sum(groups[g][c].value for g, c in enumerate(solution.choices)))


@pytest.mark.parametrize("seed", range(25))
def test_label_limited_options_match_brute_force(seed):
    rng = random.Random(100 + seed)
    groups = random_groups(rng, rng.randint(1, 5), 4, labels=4)
    capacity = rng.random() * len(groups) * 0.6
    limit = rng.randint(1, 3)
    expected = brute_force(groups, capacity, limit, per_label_value=0.5)
    options, exact = limited_options(groups, limit, capacity, per_label_value=0.5)
    assert exact
    if expected is None:
        assert not options
        return
    assert min(o.value for o in options) == pytest.approx(expected, abs=1e-9)
    for option in options:            # every option is a real choice within the limit
        picked = [groups[g][c] for g, c in enumerate(option.payload)]
        assert len({o.label for o in picked}) <= limit
        assert option.weight == pytest.approx(sum(o.weight for o in picked))
    weights = [o.weight for o in options]
    values = [o.value for o in options]
    assert weights == sorted(weights) and values == sorted(values, reverse=True)   # Pareto


def test_thinned_frontier_stays_feasible_and_near_the_bound():
    rng = random.Random(7)
    groups = [[Option(rng.random(), rng.random()) for _ in range(6)] for _ in range(60)]
    capacity = 15.0
    exact = solve(groups, capacity)
    thinned = solve(groups, capacity, max_states=50)
    assert exact.exact and exact.largest_frontier > 50
    assert thinned.weight <= capacity + 1e-9 and thinned.largest_frontier <= 50
    assert thinned.lower_bound <= exact.value + 1e-9 <= thinned.value + 1e-9
    assert thinned.value <= exact.value * 1.05


def test_lagrangian_bound_is_tight_for_a_convex_instance():
    # One group with options on a line: the LP optimum is an interpolation, the bound meets it.
    groups = [[Option(0.0, 10.0), Option(1.0, 5.0), Option(2.0, 0.0)]]
    assert lagrangian_bound(groups, 1.5) == pytest.approx(2.5)
    assert lagrangian_bound(groups, math.inf) == 0.0
    assert solve(groups, 1.5).value == 5.0


def test_deterministic_ties():
    groups = [[Option(1.0, 1.0), Option(1.0, 1.0)], [Option(0.0, 2.0), Option(0.0, 2.0)]]
    assert solve(groups, 5.0).choices == [0, 0] == solve(groups, 5.0).choices


def test_empty_group_rejected():
    with pytest.raises(ValueError, match="at least one option"):
        solve([[]], 1.0)
