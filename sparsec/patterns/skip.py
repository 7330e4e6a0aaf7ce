"""``skip``: the head is not computed; its output is zero. No pair is kept, so any family
holds its (empty) mask when head groups merge."""
from __future__ import annotations

import sympy

from sparsec.patterns.base import Pattern, register


@register
class Skip(Pattern):
    kind = "skip"
    computes_none = True
    triton_template = None         # writes zeros

    def index_keep(self, params, i, j, d, ops):
        return ops.full(d, False)

    def reads_bounded_keys(self, params):
        return True                # none

    def pairs(self, params, n, causal):
        return 0

    def pairs_expr(self, params, causal):
        return sympy.Integer(0)

    def recall(self, profile, params):
        return 0.0

    def fit(self, profiles, recall):
        return {}, 0.0
