"""``sink_window``: the first ``sink`` keys every query sees, plus a window ("A-shape" /
streaming heads, StreamingLLM).

params: ``sink`` (Elastic) and ``window`` (Elastic).
"""
from __future__ import annotations

import sympy
import torch

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Elastic, Pattern, register
from sparsec.patterns.shared import SYMBOLIC, band, is_fixed, sink_pairs, size_at, window_pairs


@register
class SinkWindow(Pattern):
    kind = "sink_window"
    elastic_params = frozenset({"sink", "window"})
    triton_template = "index"
    triton_flags = {"HAS_SINK": True, "HAS_COLUMNS": False, "MULTI_DIAGONAL": False}

    def index_keep(self, params, i, j, d, ops):
        return (j < ops.size(params["sink"])) | band(d, ops.size(params["window"]), ops)

    def reads_bounded_keys(self, params):
        return is_fixed(params["sink"]) and is_fixed(params["window"])

    def without_leading_keys(self, params, dropped, n_q, n_k):
        """The sinks are the first keys: ``dropped`` of them are gone (none left: a window)."""
        fixed = self.fixed_sizes(params, n_k)
        sink = fixed["sink"][0] - dropped
        if sink <= 0:
            return "window", {"window": fixed["window"]}
        return self.kind, {"sink": [sink, 0], "window": fixed["window"]}

    def merge(self, first, second):
        return {"sink": Elastic.widest(first["sink"], second["sink"]),
                "window": Elastic.widest(first["window"], second["window"])}

    def cover(self, params, other_kind, other_params):
        """A sink + window holds a window."""
        if other_kind != "window":
            return None
        return {"sink": params["sink"], "window": Elastic.widest(params["window"], other_params["window"])}

    def pairs(self, params, n, causal):
        sink, w = size_at(params, "sink", n), size_at(params, "window", n)
        return window_pairs(n, w, causal) + sink_pairs(n, sink, w, causal)

    def pairs_expr(self, params, causal):
        sink, w = (Elastic.from_json(params[k]).expr() for k in ("sink", "window"))
        return window_pairs(N, w, causal, lo=sympy.Min) + sink_pairs(N, sink, w, causal, **SYMBOLIC)

    def _recall_table(self, profile, sinks: int) -> torch.Tensor:
        """``[sinks, max|d| + 2]``: recall of ``(sink = s + 1, window = w)`` at ``[s, w]``.

        Sink and window masses are exact; their overlap (sink keys near the diagonal) is
        :func:`~fitting.column_window_mass`'s estimate, exact at power-of-two windows.
        """
        window = fitting.window_mass(profile)
        widths = torch.arange(len(window))
        overlap = fitting.column_window_mass(profile, torch.arange(sinks), widths).cumsum(0)
        sink = profile.column_mass[:sinks].cumsum(0)[:, None]
        table = fitting.union_recall(sink, window[None, :], overlap, profile.total)
        return table.cummax(1).values      # a larger window never loses mass

    def recall(self, profile, params):
        sink = min(size_at(params, "sink", profile.n_k), profile.n_k)
        table = self._recall_table(profile, sink)
        return float(table[-1, min(size_at(params, "window", profile.n_k), table.shape[1] - 1)])

    def fit(self, profiles, recall):
        """The (sink, window) pair with the fewest pairs at the longest length; then the
        sink count is kept and the window refitted per length (sink tokens are specific
        tokens, e.g. BOS, whose number does not grow with N)."""
        longest = profiles[-1]
        table = self._recall_table(longest, min(fitting.SINK_COLUMNS, longest.n_k))
        candidates = []
        for sink in range(1, table.shape[0] + 1):
            w = fitting.smallest_meeting(table[sink - 1], recall)
            cost = window_pairs(longest.n_k, w, longest.causal) + sink_pairs(longest.n_k, sink, w, longest.causal)
            candidates.append((float(table[sink - 1, w]), cost, sink))
        sink = fitting.cheapest(candidates, recall)
        sizes = [(p.n_k, fitting.smallest_meeting(self._recall_table(p, min(sink, p.n_k))[-1], recall))
                 for p in profiles]
        params = {"sink": Elastic(float(sink)).to_json(), "window": fitting.fit_elastic(sizes).to_json()}
        return params, fitting.worst_recall(self, profiles, params)
