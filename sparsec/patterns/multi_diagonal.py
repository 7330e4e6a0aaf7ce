"""``multi_diagonal``: bands around periodic diagonals, e.g. the same position in other
frames of a video DiT (Sparse-vDiT, Sparse VideoGen).

params: ``period`` (Elastic, tokens between diagonals, e.g. tokens per video frame),
``width`` (Elastic, half-width of each diagonal band) and ``count`` (how many diagonals on
each side of the main one, main included; 0 means all).
"""
from __future__ import annotations

import sympy
import torch

from sparsec.patterns import fitting
from sparsec.patterns.base import N, Elastic, Pattern, TorchOps, full_pairs, register
from sparsec.patterns.shared import is_fixed, window_pairs

# A multi_diagonal fit that needs this fraction of the diagonals at the calibration length
# keeps them all (count 0): the far ones hold few pairs, and "all" carries over to longer N.
ALL_DIAGONALS = 0.75


@register
class MultiDiagonal(Pattern):
    """params: ``period`` (Elastic, tokens between diagonals, e.g. tokens per video frame),
    ``width`` (Elastic, half-width of each diagonal band) and ``count`` (how many diagonals
    on each side of the main one, main included; 0 means all)."""

    kind = "multi_diagonal"
    elastic_params = frozenset({"period", "width"})
    triton_template = "index"
    triton_flags = {"HAS_SINK": False, "HAS_COLUMNS": False, "MULTI_DIAGONAL": True}

    def merge(self, first, second):
        """The wider band and more diagonals (``count`` 0 is all of them), at one period."""
        if first["period"] != second["period"]:
            return None
        counts = int(first.get("count", 0)), int(second.get("count", 0))
        return {"period": first["period"], "width": Elastic.widest(first["width"], second["width"]),
                "count": 0 if 0 in counts else max(counts)}

    def costly_pair_mask(self, params, block_m, block_n):
        """The nearest diagonal of every pair is a division by the period (an elastic one read
        per score: on FA4 5.36 ms against Triton's 1.26, period N/8 at 16k, H200)."""
        return True

    def reads_bounded_keys(self, params):
        """A fixed number of diagonals (``count`` > 0) of a fixed width; all of them
        (``count`` 0) grow with the length."""
        return int(params.get("count", 0)) > 0 and is_fixed(params["width"])

    def index_keep(self, params, i, j, d, ops):
        """Offsets within ``width`` of a kept diagonal ``m * period`` (``|m| < count``). The
        distance to the diagonals is convex in ``m``, so the nearest kept one is the nearest
        diagonal clamped to the kept range: bands wider than half the period overlap and
        the main band keeps its full width even with ``count = 1``."""
        period, width = ops.size(params["period"]), ops.size(params["width"])
        # The nearest diagonal m = round(d / period), halves to even (as torch.round).
        m = d // period
        twice_r = 2 * (d - m * period)
        m = ops.where((twice_r > period) | ((twice_r == period) & (m % 2 == 1)), m + 1, m)
        count = int(params.get("count", 0))
        if count > 0:
            m = ops.minimum(ops.maximum(m, 1 - count), count - 1)
        return ops.abs(d - m * period) < width

    def _kept_offsets(self, params, n_q, n_k) -> torch.Tensor:
        """Which offsets ``1 - n_q ... n_k - 1`` the pattern keeps (it depends on ``d`` only)."""
        return self.index_keep(params, None, None, torch.arange(1 - n_q, n_k), TorchOps(n_q, n_k))

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
        return window_pairs(N, width, causal, lo=sympy.Min) + sides * band * off_main

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
        for period in fitting.period_candidates(fitting.abs_offset_mass(profile)):
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
