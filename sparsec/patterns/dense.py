"""``dense``: every pair. It runs plain attention (``scaled_dot_product_attention``), never a
sparse kernel; every merge of head groups can fall back to it."""
from __future__ import annotations

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Pattern, full_pairs, register


@register
class Dense(Pattern):
    kind = "dense"
    computes_all = True
    triton_template = None         # runs scaled_dot_product_attention

    def index_keep(self, params, i, j, d, ops):
        return ops.full(d, True)

    def cover(self, params, other_kind, other_params):
        return params              # every pair: holds any mask

    def pairs(self, params, n, causal):
        return full_pairs(n, causal)

    def pairs_expr(self, params, causal):
        return full_pairs(N, causal)

    def recall(self, profile, params):
        return profile.total

    def fit(self, profiles, recall):
        return {}, fitting.worst_recall(self, profiles, {})
