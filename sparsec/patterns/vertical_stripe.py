"""``vertical_stripe``: key columns every query sees plus a local window (vertical stripes /
global tokens: BigBird, MInference).

params: ``columns`` (key positions; those past the sequence end are dropped) and ``window``
(Elastic, a local band that keeps the diagonal).
"""
from __future__ import annotations

import sympy
import torch

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Elastic, Pattern, register
from sparsec.patterns.shared import SYMBOLIC, band, column_pairs, is_fixed, size_at, window_pairs

# Most stripe columns a vertical_stripe fit keeps.
MAX_STRIPES = 64


def _fixed_tokens(size) -> int | None:
    """A length-independent size in tokens, or None."""
    size = Elastic.from_json(size)
    return size.at(0) if size.b == 0 else None


@register
class VerticalStripe(Pattern):
    """params: ``columns`` (key positions every query sees; those past the sequence end are
    dropped) and ``window`` (Elastic, a local band that keeps the diagonal).

    Columns are *positional*: a fit only ever keeps a leading prefix of sink keys
    ``0 .. sink - 1`` and/or the periodic keys ``phase + k * period`` (every ``period``-th
    key, as many as :data:`MAX_STRIPES` allows, so the rule carries over to longer
    inputs). Which tokens matter by content (a separator, a name) moves with the input, so
    absolute positions taken from calibration text would mean nothing on another input; a
    head whose stripes follow content has its mass spread over many positions in the
    calibration profiles, no positional rule reaches the recall, and it takes another
    pattern. ``columns`` stays a list, the form the kernels, ONNX and Triton paths read."""

    kind = "vertical_stripe"
    elastic_params = frozenset({"window"})
    index_list_params = frozenset({"columns"})
    triton_template = "index"
    triton_flags = {"HAS_SINK": False, "HAS_COLUMNS": True, "MULTI_DIAGONAL": False}

    def index_keep(self, params, i, j, d, ops):
        kept = band(d, ops.size(params["window"]), ops)
        columns = sorted({int(c) for c in params["columns"]})
        if not columns:
            return kept
        table = [False] * (columns[-1] + 1)           # a flag per key position up to the last column
        for c in columns:
            table[c] = True
        stripe = (j < len(table)) & ops.lookup(table, ops.minimum(j, len(table) - 1))
        return kept | stripe

    def reads_bounded_keys(self, params):
        """A fixed list of columns and a fixed window."""
        return is_fixed(params["window"])

    def without_leading_keys(self, params, dropped, n_q, n_k):
        """Columns are key positions: they move ``dropped`` keys left, the gone ones go
        (none left: a window)."""
        fixed = self.fixed_sizes(params, n_k)
        columns = sorted({int(c) - dropped for c in params["columns"] if int(c) >= dropped})
        if not columns:
            return "window", {"window": fixed["window"]}
        return self.kind, {"columns": columns, "window": fixed["window"]}

    def cover(self, params, other_kind, other_params):
        """Stripes hold a window, and a sink + window whose sink is a fixed number of keys."""
        if other_kind not in ("window", "sink_window"):
            return None
        columns = set(params["columns"])
        if other_kind == "sink_window":
            sink = _fixed_tokens(other_params["sink"])
            if sink is None:
                return None
            columns |= set(range(sink))
        return {"columns": sorted(columns), "window": Elastic.widest(params["window"], other_params["window"])}

    def merge(self, first, second):
        """Both rules' columns (positional too) and the wider window."""
        columns = sorted(set(first["columns"]) | set(second["columns"]))
        return {"columns": columns, "window": Elastic.widest(first["window"], second["window"])}

    def pairs(self, params, n, causal):
        w = size_at(params, "window", n)
        columns = {c for c in params["columns"] if c < n}
        return window_pairs(n, w, causal) + sum(column_pairs(n, c, w, causal) for c in columns)

    def pairs_expr(self, params, causal):
        """Exact for ``N`` past the last column."""
        w = Elastic.from_json(params["window"]).expr()
        return window_pairs(N, w, causal, lo=sympy.Min) + sum(
            column_pairs(N, c, w, causal, **SYMBOLIC) for c in set(params["columns"]))

    def costly_pair_mask(self, params, block_m, block_n):
        """The stripe columns are a per-key table."""
        return bool(params["columns"])

    def describe(self, params):
        return f"columns={params['columns']}, window={Elastic.from_json(params['window'])}"

    def recall(self, profile, params):
        """The stripes' mass and the window's, their overlap :func:`~fitting.column_window_mass`'s
        estimate."""
        columns = torch.tensor(sorted({c for c in params["columns"] if c < profile.n_k}), dtype=torch.long)
        window = fitting.window_mass(profile)
        width = torch.tensor([size_at(params, "window", profile.n_k)])
        overlap = fitting.column_window_mass(profile, columns, width).sum(0)
        return float(fitting.union_recall(profile.column_mass[columns].sum(), window[width.clamp(max=len(window) - 1)],
                                          overlap, profile.total)[0])

    def _rule_widths(self, profiles, rules: list[list[int]], recall: float) -> list[tuple[float, list]]:
        """For each rule's columns: the lowest recall reached over the lengths, and the
        smallest window meeting ``recall`` at each length (the widest where none does), all
        rules of one length at once. The stripes' overlap with the window is each column's
        :func:`~fitting.column_window_mass` row, computed once for every column some rule
        keeps: the table, not the rules, is what costs."""
        used = sorted(set().union(*rules))
        worst, sizes = [1.0] * len(rules), [[] for _ in rules]
        for p in profiles:
            columns = torch.tensor([c for c in used if c < p.n_k], dtype=torch.long)
            member = torch.zeros(len(rules), len(columns), dtype=torch.float64)      # rule x column
            position = {int(c): i for i, c in enumerate(columns)}
            for r, rule in enumerate(rules):
                member[r, [position[c] for c in rule if c < p.n_k]] = 1.0
            window = fitting.window_mass(p)
            widths = torch.arange(len(window))
            overlaps = member @ fitting.column_window_mass(p, columns, widths)          # [rules, widths]
            stripes = member @ p.column_mass[columns].double()
            reached = fitting.union_recall(stripes[:, None], window[None, :], overlaps, p.total).cummax(1).values
            for r in range(len(rules)):
                w = fitting.smallest_meeting(reached[r], recall)
                sizes[r].append((p.n_k, w))
                worst[r] = min(worst[r], float(reached[r, w]))
        return list(zip(worst, sizes))

    def fit(self, profiles, recall):
        """The cheapest positional rule (see the class docstring) meeting ``recall`` at every
        calibration length: sink prefixes up to :data:`~fitting.SINK_COLUMNS`, with or
        without the periodic keys of a period found in the column mass (its phase the
        residue holding the most mass); the window is the smallest per length, made elastic.
        """
        longest, shortest = profiles[-1], profiles[0]
        rules = [positional_columns(sink, *(periodic or (0, 0)))
                 for periodic in [None, *_periodic_candidates(profiles)]
                 # fewer than 3 periods at the shortest length: no evidence of a period
                 if periodic is None or periodic[1] + 2 * periodic[0] < shortest.n_k
                 for sink in range(fitting.SINK_COLUMNS + 1)]
        candidates = []
        for columns, (reached, sizes) in zip(rules, self._rule_widths(profiles, rules, recall)):
            w = sizes[-1][1]
            cost = window_pairs(longest.n_k, w, longest.causal) + sum(
                column_pairs(longest.n_k, c, w, longest.causal) for c in columns if c < longest.n_k)
            candidates.append((reached, cost, (columns, sizes)))
        columns, sizes = fitting.cheapest(candidates, recall)
        params = {"columns": columns, "window": fitting.fit_elastic(sizes).to_json()}
        return params, fitting.worst_recall(self, profiles, params)


def positional_columns(sink: int, period: int, phase: int) -> list[int]:
    """The sink prefix ``0 .. sink - 1`` and (``period > 0``) the periodic keys
    ``phase + k * period``, sorted, at most :data:`MAX_STRIPES` in all."""
    columns, position = set(range(sink)), phase
    while period > 0 and len(columns) < MAX_STRIPES:
        columns.add(position)
        position += period
    return sorted(columns)


def _periodic_candidates(profiles) -> list[tuple[int, int]]:
    """``(period, phase)`` pairs to try: periods from the column mass's autocorrelation at
    every length, each with the phase whose keys hold the most mass past the sinks (summed
    over the lengths, so one phase serves all of them), kept when the rule is supported
    at every length (:func:`_supports_period`) and fits in :data:`MAX_STRIPES` columns."""
    periods = set()
    for p in profiles:
        periods.update(fitting.period_candidates(p.column_mass))
    found = []
    for period in sorted(periods):
        if profiles[-1].n_k / period > MAX_STRIPES:
            continue
        mass = torch.zeros(period, dtype=torch.float64)
        for p in profiles:
            keys = torch.arange(fitting.SINK_COLUMNS, p.n_k)
            mass.index_add_(0, keys % period, p.column_mass[fitting.SINK_COLUMNS:].double())
        phase = int(mass.argmax())
        if all(_supports_period(p, period, phase) for p in profiles):
            found.append((period, phase))
    return found


# A periodic key is a stripe when its mass exceeds this multiple of the median mass of the
# keys up to the next one; a period is kept when this fraction of its keys are stripes.
STRIPE_CONTRAST = 1.5
STRIPE_SUPPORT = 0.75


def _supports_period(profile, period: int, phase: int) -> bool:
    """Whether most keys ``phase + k * period`` of one profile stand out from the keys
    between them: a period that merely passes through a few content stripes (any two
    columns share many periods) is not a positional rule."""
    mass = profile.column_mass.double()
    count = len(range(phase, profile.n_k - 1, period))
    if count == 0:
        return False
    # Row k: periodic key k, then the keys up to the next one (NaN past the last key).
    rows = torch.full((count * period,), float("nan"), dtype=torch.float64)
    rows[:profile.n_k - phase] = mass[phase:phase + count * period]
    rows = rows.view(count, period)
    stripes = rows[:, 0] > STRIPE_CONTRAST * rows[:, 1:].nanmedian(1).values
    return int(stripes.sum()) >= STRIPE_SUPPORT * count
