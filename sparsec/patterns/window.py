"""``window``: keys within ``window`` positions of the diagonal (sliding window, Longformer).

params: ``window`` (Elastic).
"""
from __future__ import annotations

import sympy

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Elastic, Pattern, register
from sparsec.patterns.shared import band, is_fixed, size_at, window_pairs


@register
class Window(Pattern):
    kind = "window"
    elastic_params = frozenset({"window"})
    triton_template = "index"
    triton_flags = {"HAS_SINK": False, "HAS_COLUMNS": False, "MULTI_DIAGONAL": False}

    def index_keep(self, params, i, j, d, ops):
        return band(d, ops.size(params["window"]), ops)

    def native_window(self, params, n_k):
        return size_at(params, "window", n_k)

    def reads_bounded_keys(self, params):
        return is_fixed(params["window"])

    def merge(self, first, second):
        return {"window": Elastic.widest(first["window"], second["window"])}

    def pairs(self, params, n, causal):
        return window_pairs(n, size_at(params, "window", n), causal)

    def pairs_expr(self, params, causal):
        return window_pairs(N, Elastic.from_json(params["window"]).expr(), causal, lo=sympy.Min)

    def recall(self, profile, params):
        mass = fitting.window_mass(profile)
        return float(mass[min(size_at(params, "window", profile.n_k), len(mass) - 1)])

    def fit(self, profiles, recall):
        """Exact: the smallest window whose diagonal mass reaches ``recall``, per length."""
        sizes = [(p.n_k, fitting.smallest_meeting(fitting.window_mass(p), recall)) for p in profiles]
        params = {"window": fitting.fit_elastic(sizes).to_json()}
        return params, fitting.worst_recall(self, profiles, params)
