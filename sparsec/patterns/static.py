"""Static pattern families whose mask is index arithmetic on (query, key) positions.

References: sliding window (Longformer), sink + window "A-shape" / streaming heads
(StreamingLLM), vertical stripes / global tokens (BigBird, MInference), periodic
diagonals of video DiTs (Sparse-vDiT, Sparse VideoGen).

Each family also counts its pairs (exactly, and as a sympy expression in ``N``) and fits
its parameters to calibration profiles (:mod:`sparsec.patterns.fitting`).
"""
from __future__ import annotations

import sympy
import torch

from . import fitting
from .base import N, Elastic, Pattern, full_pairs, register

# Most stripe columns a vertical_stripe fit keeps.
MAX_STRIPES = 64
# A multi_diagonal fit that needs this fraction of the diagonals at the calibration length
# keeps them all (count 0): the far ones hold few pairs, and "all" carries over to longer N.
ALL_DIAGONALS = 0.75


def _window(d: torch.Tensor, width: int) -> torch.Tensor:
    # Causal heads keep 0 <= d < width (the causal cut removes d < 0); non-causal heads
    # keep the symmetric band |d| < width.
    return d.abs() < width


# -- pair counts: one formula for numbers (min/max) and for sympy (Min/Max) --

def _window_pairs(n, w, causal, lo=min):
    """Pairs with ``|d| < w`` at ``n_q = n_k = n``."""
    w = lo(w, n)
    return w * n - w * (w - 1) / 2 if causal else n * (2 * w - 1) - w * (w - 1)


def _column_pairs(n, column, w, causal, lo=min, hi=max):
    """Pairs of key ``column`` (< n) outside the window ``|d| < w``."""
    w = lo(w, n)
    rows_after = hi(0, n - w - column)                 # d >= w
    return rows_after if causal else rows_after + hi(0, column - w + 1)   # and d <= -w


def _sink_pairs(n, sink, w, causal, lo=min, hi=max):
    """Pairs of the first ``sink`` key columns outside the window (``_column_pairs`` summed)."""
    w, sink = lo(w, n), lo(sink, n)
    after = lo(sink, n - w)
    pairs = after * (n - w) - after * (after - 1) / 2
    before = hi(0, sink - w)
    return pairs if causal else pairs + before * (before + 1) / 2


_SYMBOLIC = {"lo": sympy.Min, "hi": sympy.Max}


def _size(params: dict, name: str, n: int) -> int:
    return Elastic.from_json(params[name]).at(n)


def _width_grid(largest: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... up to ``largest``: window sizes a coarse search tries."""
    grid, size = set(), 1
    while size <= largest:
        grid.update({size, min(largest, size * 3 // 2)})
        size *= 2
    return sorted(grid | {largest})


@register
class Dense(Pattern):
    kind = "dense"

    def keep(self, params, d, rows, cols, n_q, n_k):
        return torch.ones_like(d, dtype=torch.bool)

    def pairs(self, params, n, causal):
        return full_pairs(n, causal)

    def pairs_expr(self, params, causal):
        return full_pairs(N, causal)

    def recall(self, profile, params):
        return profile.total

    def fit(self, profiles, recall):
        return {}, fitting.worst_recall(self, profiles, {})


@register
class Skip(Pattern):
    """The head is not computed: its output is zero."""

    kind = "skip"

    def keep(self, params, d, rows, cols, n_q, n_k):
        return torch.zeros_like(d, dtype=torch.bool)

    def pairs(self, params, n, causal):
        return 0

    def pairs_expr(self, params, causal):
        return sympy.Integer(0)

    def recall(self, profile, params):
        return 0.0

    def fit(self, profiles, recall):
        return {}, 0.0


@register
class Window(Pattern):
    """params: ``window`` (Elastic) — keys within ``window`` positions of the diagonal."""

    kind = "window"

    def merge(self, first, second):
        return {"window": Elastic.widest(first["window"], second["window"])}

    def keep(self, params, d, rows, cols, n_q, n_k):
        return _window(d, Elastic.from_json(params["window"]).at(n_k))

    def pairs(self, params, n, causal):
        return _window_pairs(n, _size(params, "window", n), causal)

    def pairs_expr(self, params, causal):
        return _window_pairs(N, Elastic.from_json(params["window"]).expr(), causal, lo=sympy.Min)

    def recall(self, profile, params):
        mass = fitting.window_mass(profile)
        return float(mass[min(_size(params, "window", profile.n_k), len(mass) - 1)])

    def fit(self, profiles, recall):
        """Exact: the smallest window whose diagonal mass reaches ``recall``, per length."""
        sizes = [(p.n_k, fitting.smallest_meeting(fitting.window_mass(p), recall)) for p in profiles]
        params = {"window": fitting.fit_elastic(sizes).to_json()}
        return params, fitting.worst_recall(self, profiles, params)


@register
class SinkWindow(Pattern):
    """params: ``sink`` (Elastic, first keys every query sees) and ``window`` (Elastic)."""

    kind = "sink_window"

    def merge(self, first, second):
        return {"sink": Elastic.widest(first["sink"], second["sink"]),
                "window": Elastic.widest(first["window"], second["window"])}

    def keep(self, params, d, rows, cols, n_q, n_k):
        sink = Elastic.from_json(params["sink"]).at(n_k)
        return (cols[None, :] < sink) | _window(d, Elastic.from_json(params["window"]).at(n_k))

    def pairs(self, params, n, causal):
        sink, w = _size(params, "sink", n), _size(params, "window", n)
        return _window_pairs(n, w, causal) + _sink_pairs(n, sink, w, causal)

    def pairs_expr(self, params, causal):
        sink, w = (Elastic.from_json(params[k]).expr() for k in ("sink", "window"))
        return _window_pairs(N, w, causal, lo=sympy.Min) + _sink_pairs(N, sink, w, causal, **_SYMBOLIC)

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
        sink = min(_size(params, "sink", profile.n_k), profile.n_k)
        table = self._recall_table(profile, sink)
        return float(table[-1, min(_size(params, "window", profile.n_k), table.shape[1] - 1)])

    def fit(self, profiles, recall):
        """The (sink, window) pair with the fewest pairs at the longest length; then the
        sink count is kept and the window refitted per length (sink tokens are specific
        tokens, e.g. BOS, whose number does not grow with N)."""
        longest = profiles[-1]
        table = self._recall_table(longest, min(fitting.SINK_COLUMNS, longest.n_k))
        candidates = []
        for sink in range(1, table.shape[0] + 1):
            w = fitting.smallest_meeting(table[sink - 1], recall)
            cost = _window_pairs(longest.n_k, w, longest.causal) + _sink_pairs(longest.n_k, sink, w, longest.causal)
            candidates.append((float(table[sink - 1, w]), cost, sink))
        sink = fitting.cheapest(candidates, recall)
        sizes = [(p.n_k, fitting.smallest_meeting(self._recall_table(p, min(sink, p.n_k))[-1], recall))
                 for p in profiles]
        params = {"sink": Elastic(float(sink)).to_json(), "window": fitting.fit_elastic(sizes).to_json()}
        return params, fitting.worst_recall(self, profiles, params)


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

    def merge(self, first, second):
        """Both rules' columns (positional too) and the wider window."""
        columns = sorted(set(first["columns"]) | set(second["columns"]))
        return {"columns": columns, "window": Elastic.widest(first["window"], second["window"])}

    def keep(self, params, d, rows, cols, n_q, n_k):
        columns = torch.tensor([c for c in params["columns"] if c < n_k], dtype=torch.long)
        stripe = torch.isin(cols, columns.to(cols.device))
        return stripe[None, :] | _window(d, Elastic.from_json(params["window"]).at(n_k))

    def pairs(self, params, n, causal):
        w = _size(params, "window", n)
        columns = {c for c in params["columns"] if c < n}
        return _window_pairs(n, w, causal) + sum(_column_pairs(n, c, w, causal) for c in columns)

    def pairs_expr(self, params, causal):
        """Exact for ``N`` past the last column."""
        w = Elastic.from_json(params["window"]).expr()
        return _window_pairs(N, w, causal, lo=sympy.Min) + sum(
            _column_pairs(N, c, w, causal, **_SYMBOLIC) for c in set(params["columns"]))

    def describe(self, params):
        return f"columns={params['columns']}, window={Elastic.from_json(params['window'])}"

    def _recall_at(self, profile, columns: torch.Tensor, widths: torch.Tensor,
                   overlaps: torch.Tensor | None = None) -> torch.Tensor:
        """Recall of the stripes ``columns`` with each window width; the stripes' overlap
        with the window is :func:`~fitting.column_window_mass`'s estimate (its rows for
        ``columns``, ``overlaps``, when the caller has them)."""
        window = fitting.window_mass(profile)
        stripes = profile.column_mass[columns].sum()
        if overlaps is None:
            overlaps = fitting.column_window_mass(profile, columns, widths)
        return fitting.union_recall(stripes, window[widths.clamp(max=len(window) - 1)], overlaps.sum(0),
                                    profile.total)

    def recall(self, profile, params):
        columns = torch.tensor(sorted({c for c in params["columns"] if c < profile.n_k}), dtype=torch.long)
        return float(self._recall_at(profile, columns, torch.tensor([_size(params, "window", profile.n_k)]))[0])

    def _stripe_widths(self, profiles, columns: list[int], recall: float,
                       tables: list[tuple]) -> tuple[float, list[tuple[int, int]]]:
        """The smallest window meeting ``recall`` at each length with these columns, and the
        lowest recall reached (the recall of the widest window where none meets it).
        ``tables[i]``: profile ``i``'s ``(row of each key column, column_window_mass at every
        width)`` for the columns the fit's rules use."""
        sizes, worst = [], 1.0
        for p, table in zip(profiles, tables):
            kept = torch.tensor([c for c in columns if c < p.n_k], dtype=torch.long)
            widths = torch.arange(len(fitting.window_mass(p)))
            row_of, overlaps = table
            reached = self._recall_at(p, kept, widths, overlaps[row_of[kept]]).cummax(0).values
            w = fitting.smallest_meeting(reached, recall)
            sizes.append((p.n_k, w))
            worst = min(worst, float(reached[w]))
        return worst, sizes

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
        # Each profile's column_window_mass rows for every column some rule keeps, computed
        # once: the table, not the rules, is what costs.
        used = torch.tensor(sorted(set().union(*rules)), dtype=torch.long)
        tables = []
        for p in profiles:
            rows = used[used < p.n_k]
            row_of = torch.full((p.n_k,), -1, dtype=torch.long)
            row_of[rows] = torch.arange(len(rows))
            widths = torch.arange(len(fitting.window_mass(p)))
            tables.append((row_of, fitting.column_window_mass(p, rows, widths)))
        candidates = []
        for columns in rules:
            reached, sizes = self._stripe_widths(profiles, columns, recall, tables)
            w = sizes[-1][1]
            cost = _window_pairs(longest.n_k, w, longest.causal) + sum(
                _column_pairs(longest.n_k, c, w, longest.causal) for c in columns if c < longest.n_k)
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
        periods.update(_period_candidates(p.column_mass))
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
    mass = profile.column_mass
    stripes = total = 0
    for column in range(phase, profile.n_k - 1, period):
        between = mass[column + 1:min(column + period, profile.n_k)]
        total += 1
        stripes += bool(mass[column] > STRIPE_CONTRAST * between.median())
    return total > 0 and stripes >= STRIPE_SUPPORT * total


@register
class MultiDiagonal(Pattern):
    """params: ``period`` (Elastic, tokens between diagonals, e.g. tokens per video frame),
    ``width`` (Elastic, half-width of each diagonal band) and ``count`` (how many diagonals
    on each side of the main one, main included; 0 means all)."""

    kind = "multi_diagonal"

    def merge(self, first, second):
        """The wider band and more diagonals (``count`` 0 is all of them), at one period."""
        if first["period"] != second["period"]:
            return None
        counts = int(first.get("count", 0)), int(second.get("count", 0))
        return {"period": first["period"], "width": Elastic.widest(first["width"], second["width"]),
                "count": 0 if 0 in counts else max(counts)}

    def keep(self, params, d, rows, cols, n_q, n_k):
        """Offsets within ``width`` of a kept diagonal ``m * period`` (``|m| < count``). The
        distance to the diagonals is convex in ``m``, so the nearest kept one is the nearest
        diagonal clamped to the kept range: bands wider than half the period overlap and
        the main band keeps its full width even with ``count = 1`` (issue #14)."""
        period = Elastic.from_json(params["period"]).at(n_k)
        width = Elastic.from_json(params["width"]).at(n_k)
        nearest = torch.round(d.double() / period).long()     # index m of the closest diagonal
        count = int(params.get("count", 0))
        if count > 0:
            nearest = nearest.clamp(1 - count, count - 1)
        return (d - nearest * period).abs() < width

    def _kept_offsets(self, params, n_q, n_k) -> torch.Tensor:
        """Which offsets ``1 - n_q ... n_k - 1`` the pattern keeps (it depends on ``d`` only)."""
        return self.keep(params, torch.arange(1 - n_q, n_k), None, None, n_q, n_k)

    def pairs(self, params, n, causal):
        return int(fitting.offset_pair_counts(n, n, causal)[self._kept_offsets(params, n, n)].sum())

    def pairs_expr(self, params, causal):
        """Approximate: each diagonal is a band of ``min(2*width - 1, period)`` offsets; with
        ``count = 0`` the bands cover that fraction of the score matrix, otherwise diagonal
        ``k`` holds ``band * (N - k*period)`` pairs."""
        period, width = (Elastic.from_json(params[k]).expr() for k in ("period", "width"))
        band = sympy.Min(2 * width - 1, period)
        count = int(params.get("count", 0))
        if count == 0:
            return band / period * full_pairs(N, causal)
        sides = 1 if causal else 2
        diagonals = sympy.Min(count - 1, N / period)            # off-main diagonals inside the matrix
        off_main = diagonals * N - period * diagonals * (diagonals + 1) / 2     # sum of N - k*period
        return _window_pairs(N, width, causal, lo=sympy.Min) + sides * band * off_main

    def recall(self, profile, params):
        """Exact: the diagonal mass at the kept offsets."""
        return float(profile.diagonal_mass[self._kept_offsets(params, profile.n_q, profile.n_k)].sum())

    def _tables(self, profile, period: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Recall and pair count of ``(count = m + 1, width = w + 1)`` at ``[m, w]``, for one
        period: offsets binned by their diagonal index and distance to it, then summed."""
        d = profile.offsets
        nearest = torch.round(d.double() / period).long()
        index, distance = nearest.abs(), (d - nearest * period).abs()
        shape = (int(index.max()) + 1, int(distance.max()) + 1)
        mass = torch.zeros(shape, dtype=torch.float64).index_put_((index, distance), profile.diagonal_mass,
                                                                  accumulate=True)
        counts = fitting.offset_pair_counts(profile.n_q, profile.n_k, profile.causal).double()
        pairs = torch.zeros(shape, dtype=torch.float64).index_put_((index, distance), counts, accumulate=True)
        return mass.cumsum(0).cumsum(1), pairs.cumsum(0).cumsum(1)

    def _fit_length(self, profile, recall) -> tuple[float, float, tuple[int, int, int]]:
        """``(recall, pairs, (period, count, width))`` of the cheapest fit at one length;
        ``count`` is 0 when every diagonal is kept."""
        candidates = []
        for period in _period_candidates(fitting.abs_offset_mass(profile)):
            reached, pairs = self._tables(profile, period)
            meets = reached >= recall - 1e-12
            if meets.any():
                flat = torch.where(meets, pairs, float("inf")).argmin()
            else:
                flat = reached.argmax()
            m, w = divmod(int(flat), reached.shape[1])
            count = 0 if m + 1 >= ALL_DIAGONALS * reached.shape[0] else m + 1
            candidates.append((float(reached[m, w]), float(pairs[m, w]), (period, count, w + 1)))
        if not candidates:      # too short to hold a second diagonal: the main one alone
            w = fitting.smallest_meeting(fitting.window_mass(profile), recall)
            return (float(fitting.window_mass(profile)[w]), 0.0, (profile.n_k, 1, w))
        best = fitting.cheapest(candidates, recall)
        return next(c for c in candidates if c[2] == best)

    def fit(self, profiles, recall):
        """Period from the diagonal profile's autocorrelation peaks, then the cheapest
        (count, width) for it, exactly from the diagonal mass. Across lengths: the period
        follows the per-length periods (a line), the count is the largest (0, all, wins),
        the width is refitted per length and made elastic."""
        fits = [self._fit_length(p, recall)[2] for p in profiles]
        periods = [f[0] for f in fits]
        if max(periods) <= 1.1 * min(periods):      # one period (up to rounding): the longest's
            period = Elastic(float(periods[-1]), 0.0, 2)
        else:
            period = fitting.fit_elastic(list(zip((p.n_k for p in profiles), periods)), minimum=2, cover=False)
        counts = [f[1] for f in fits]
        count = 0 if 0 in counts else max(counts)
        sizes = []
        for p in profiles:
            reached, _pairs = self._tables(p, period.at(p.n_k))
            row = reached[-1] if count == 0 else reached[min(count, reached.shape[0]) - 1]
            sizes.append((p.n_k, fitting.smallest_meeting(row, recall, start=0) + 1))
        params = {"period": period.to_json(), "width": fitting.fit_elastic(sizes).to_json(), "count": count}
        return params, fitting.worst_recall(self, profiles, params)


def _period_candidates(mass: torch.Tensor, limit: int = 4) -> list[int]:
    """Candidate periods of a ``|d|`` mass profile: the strongest local maxima of its
    autocorrelation (FFT) and of the profile itself, and their neighbours (peaks are
    integer-rounded)."""
    length = len(mass)
    if length < 6:
        return []
    spectrum = torch.fft.rfft(mass, n=2 * length)
    autocorrelation = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * length)[:length]
    found = set()
    for signal in (autocorrelation, mass):
        lags = torch.arange(2, length // 2)
        if len(lags) == 0:
            continue
        peak = (signal[lags] > signal[lags - 1]) & (signal[lags] >= signal[lags + 1])
        strongest = lags[peak][signal[lags[peak]].argsort(descending=True)[:limit]]
        for lag in strongest.tolist():
            found.update({lag - 1, lag, lag + 1})
    return sorted(p for p in found if p >= 2)
