"""Calibration statistics of attention heads, and the helpers every pattern fit shares.

``calibrate`` measures, per attention site and calibration length, an
:class:`AttentionProfile`: where each head's attention mass goes. Masses are averaged over
query rows (each valid row carries mass 1), so a pattern's *recall* — the fraction of
attention mass inside its mask — is a sum over the profile:

- ``diagonal_mass[d + n_q - 1]``: mass at offset ``d`` (base.py's bottom-right convention),
  exact for offset-defined patterns (``window``, ``multi_diagonal``);
- ``column_mass[j]``: mass on key ``j`` (sinks, stripes, vertical columns);
- ``column_offset_mass[j, b]``: key ``j``'s mass split by ``|d|`` into log-spaced buckets
  (:func:`offset_bucket`), which estimates how much of a column a window already covers;
- ``block_mass[qb, kb]``: mass per square ``block`` x ``block`` tile (``block_topk``);
  ``input_block_mass`` the same per calibration input, and ``input_sampled_mass`` that of
  :data:`SAMPLED_ROWS` rows a query block alone (what a per-input estimate reads:
  ``dynamic_blocks``);
- ``input_column_mass`` and ``input_diagonal_mass``: each calibration input's own column and
  diagonal mass, and ``input_estimated_columns`` / ``input_estimated_diagonals`` those of its
  :data:`ESTIMATING_QUERIES` spread queries alone (what ``vertical_slash``'s estimate reads
  to choose an input's lines).

``fit`` functions read one head's profiles (:meth:`AttentionStats.head`) and make sizes
elastic in the sequence length with :func:`fit_elastic`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from sparsec.ir.shape_cache import shape_cache
from sparsec.patterns.base import Elastic, Pattern

# How many leading key columns sink fits consider (StreamingLLM keeps 4).
SINK_COLUMNS = 8
# Rows a query block whose block mass calibration keeps apart (``input_sampled_mass``): a
# per-input estimate reads those rows alone, and a fit that chose its layouts from every
# row's mass counted mass the estimate misses. SmolLM2 at 8k, the 116 heads its static plan
# left dense made ``dynamic_blocks`` (held-out top-1 / attention-FLOP cut of the model): 8
# rows at share 0.98 0.960 / 69.5 %, 16 rows 0.971 / 64.1 %, 16 rows at 0.99 0.976 / 62.1 %,
# 32 rows at 0.99 0.978 / 51.3 % (the estimate's cost), every row 0.977 / 31.8 %
# (docs/benchmarks.md, "What a sampled estimate keeps (session 13)").
SAMPLED_ROWS = 16
# Queries, spread over the sequence, from which vertical_slash's estimate picks an input's
# columns and diagonals (its ``queries``); calibration keeps their column and diagonal mass
# per input, so its fit counts what those queries miss.
ESTIMATING_QUERIES = 64


@shape_cache(maxsize=64)
def spread_rows(block: int, samples: int, n_q: int, device: torch.device | None = None) -> torch.Tensor:
    """``samples`` rows of each ``block``-row query block, spread over it (its first and last
    row included; the last block's clamped to ``n_q - 1``), block by block (read-only)."""
    within = torch.linspace(0, block - 1, samples, device=device).round().long()
    starts = torch.arange(math.ceil(n_q / block), device=device) * block
    return (starts[:, None] + within[None, :]).clamp(max=n_q - 1).flatten()


@shape_cache(maxsize=64)
def spread_queries(count: int, n_q: int, device: torch.device | None = None) -> torch.Tensor:
    """``count`` positions of ``n_q`` spread evenly, the last included (read-only)."""
    return torch.arange(1, count + 1, device=device) * n_q // count - 1


@dataclass
class AttentionProfile:
    """Where attention mass goes, for one site at one ``(n_q, n_k)``.

    Tensors carry a leading head dimension ``[H, ...]``, dropped by :meth:`head`. Masses
    are float64, summed over calibration batches and query rows and divided by ``rows``
    (valid query rows seen; fully masked, i.e. padded, rows are left out), so a head's
    ``column_mass`` sums to 1.
    """

    n_q: int
    n_k: int
    causal: bool                        # causal flag or a pure-causal user mask
    block: int                          # side of the square tiles of block_mass
    batches: int                        # calibration batches that ran at this length
    rows: torch.Tensor                  # [H]
    block_mass: torch.Tensor            # [H, ceil(n_q/block), ceil(n_k/block)]
    # Each calibration input's own block mass, over its own rows: [H, inputs, blocks_q, blocks_k]
    input_block_mass: torch.Tensor
    # The same of the SAMPLED_ROWS spread rows of each query block alone, summed (unscaled)
    input_sampled_mass: torch.Tensor
    column_mass: torch.Tensor           # [H, n_k]
    diagonal_mass: torch.Tensor         # [H, n_q + n_k - 1], index d + n_q - 1
    column_offset_mass: torch.Tensor    # [H, n_k, offset_buckets(n_q, n_k)]
    # Each calibration input's own column and diagonal mass, over its own rows: [H, inputs, ...]
    input_column_mass: torch.Tensor
    input_diagonal_mass: torch.Tensor
    # The same of its ESTIMATING_QUERIES spread queries alone, summed (unscaled)
    input_estimated_columns: torch.Tensor
    input_estimated_diagonals: torch.Tensor

    def head(self, h: int) -> "AttentionProfile":
        """The profile of head ``h`` alone (tensors without the head dimension)."""
        return AttentionProfile(**{f.name: (getattr(self, f.name)[h] if f.type == "torch.Tensor"
                                            else getattr(self, f.name)) for f in fields(self)})

    @property
    def offsets(self) -> torch.Tensor:
        """The offset ``d`` of each entry of ``diagonal_mass``: ``1 - n_q ... n_k - 1``."""
        return torch.arange(1 - self.n_q, self.n_k)

    @property
    def total(self) -> float:
        """Mass of one head (1, or 0 when every row was masked). Single-head profiles only."""
        return float(self.column_mass.sum())

    @property
    def sink_mass(self) -> torch.Tensor:
        """``[..., SINK_COLUMNS]``: mass on the first ``s`` keys, for ``s = 1, 2, ...``."""
        return self.column_mass[..., :SINK_COLUMNS].cumsum(-1)

    def pooled(self, block_q: int, block_k: int) -> torch.Tensor:
        """``block_mass`` summed into ``block_q x block_k`` tiles (multiples of ``block``),
        e.g. the target's ``(block_m, block_n)``."""
        if block_q % self.block or block_k % self.block:
            raise ValueError(f"tiles {block_q}x{block_k} are not multiples of the profile block {self.block}")
        fq, fk = block_q // self.block, block_k // self.block
        mass = self.block_mass
        pad_q, pad_k = -mass.shape[-2] % fq, -mass.shape[-1] % fk
        mass = torch.nn.functional.pad(mass, (0, pad_k, 0, pad_q))
        *lead, nq, nk = mass.shape
        return mass.reshape(*lead, nq // fq, fq, nk // fk, fk).sum((-3, -1))


@dataclass
class AttentionStats:
    """Calibration statistics of one attention site: a profile per ``(n_q, n_k)``."""

    num_heads: int
    causal: bool
    profiles: dict[tuple[int, int], AttentionProfile] = field(default_factory=dict)
    # None: the site has no user mask; True: every mask seen was exactly the causal mask.
    mask_is_causal: bool | None = None

    @property
    def lengths(self) -> list[int]:
        """Calibrated key lengths ``n_k``, ascending."""
        return sorted({n_k for _n_q, n_k in self.profiles})

    def head(self, h: int) -> list[AttentionProfile]:
        """Head ``h``'s profiles, shortest first: what :meth:`Pattern.fit` reads."""
        return [self.profiles[key].head(h) for key in sorted(self.profiles, key=lambda k: (k[1], k[0]))]


# -- offsets and buckets --

def offset_buckets(n_q: int, n_k: int) -> int:
    """Number of ``|d|`` buckets at this shape (``|d| < max(n_q, n_k)``)."""
    return (max(n_q, n_k) - 1).bit_length() + 1


def offset_bucket(absolute_offset: torch.Tensor) -> torch.Tensor:
    """Bucket of ``|d|``: 0 for ``d == 0``, ``b`` for ``2**(b-1) <= |d| < 2**b``."""
    return torch.frexp(absolute_offset.double()).exponent.long()


def bucket_bounds(buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: bucket ``b`` holds ``lo[b] <= |d| < hi[b]``."""
    hi = 2 ** torch.arange(buckets, dtype=torch.long)
    lo = torch.cat([torch.zeros(1, dtype=torch.long), hi[:-1]])
    return lo, hi


def offset_pair_counts(n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    """Number of (query, key) pairs at each offset ``d = 1 - n_q ... n_k - 1``."""
    d = torch.arange(1 - n_q, n_k)
    shift = n_k - n_q
    first = torch.clamp(d - shift, min=0)                       # first query row on offset d
    last = torch.clamp(n_k - 1 + d - shift, max=n_q - 1)
    counts = (last - first + 1).clamp(min=0)
    return torch.where(d >= 0, counts, 0) if causal else counts


def column_offset_range(profile: AttentionProfile, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)``: key column ``j`` has query rows at offsets ``low <= d <= high``
    (its first and last query rows; causal heads only ``d >= 0``)."""
    low = profile.n_k - profile.n_q - columns
    if profile.causal:
        low = low.clamp(min=0)
    return low, profile.n_k - 1 - columns


def feasible_offsets(profile: AttentionProfile, columns: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """How many offsets ``|d| < bound`` key column ``j`` has query rows at (broadcasting)."""
    low, high = column_offset_range(profile, columns)
    return (torch.minimum(high, bound - 1) - torch.maximum(low, 1 - bound) + 1).clamp(min=0)


# -- masses a fit reads --

def abs_offset_mass(profile: AttentionProfile) -> torch.Tensor:
    """``[max|d| + 1]``: mass at each ``|d|`` (both sides of the diagonal summed)."""
    absolute = profile.offsets.abs()
    out = torch.zeros(int(absolute.max()) + 1, dtype=profile.diagonal_mass.dtype)
    return out.index_add_(0, absolute, profile.diagonal_mass)


def window_mass(profile: AttentionProfile) -> torch.Tensor:
    """``M[w]`` = mass at ``|d| < w`` for ``w = 0 ... max|d| + 1`` (exact)."""
    mass = abs_offset_mass(profile)
    return torch.cat([mass.new_zeros(1), mass.cumsum(0)])


def column_window_mass(profile: AttentionProfile, columns: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``[len(columns), len(widths)]``: mass of each key column at ``|d| < width``.

    An estimate: exact when ``width`` is a power of two (a bucket edge); inside a bucket the
    column's mass is taken as spread evenly over the offsets it has rows at.
    """
    columns, widths = columns.long(), widths.long()
    mass = profile.column_offset_mass[columns]                             # [C, L]
    buckets = mass.shape[-1]
    below = torch.cat([mass.new_zeros(len(columns), 1), mass.cumsum(-1)], -1)   # buckets < b, [C, L + 1]
    # Buckets below width's own bucket are inside the window; width's bucket is in part.
    bucket = offset_bucket(widths).clamp(max=buckets)
    lo, hi = bucket_bounds(buckets + 1)
    c, lo, hi, w = columns[:, None], lo[bucket][None, :], hi[bucket][None, :], widths[None, :]
    start = feasible_offsets(profile, c, lo)
    fraction = (feasible_offsets(profile, c, w) - start) / (feasible_offsets(profile, c, hi) - start).clamp(min=1)
    partial = torch.nn.functional.pad(mass, (0, 1))[:, bucket]              # 0 past the last bucket
    return below[:, bucket] + partial * fraction


def smallest_meeting(cumulative: torch.Tensor, target: float, start: int = 1) -> int:
    """The first index ``>= start`` where a nondecreasing ``cumulative`` reaches ``target``;
    the last index when it never does."""
    hits = torch.nonzero(cumulative[start:] >= target - 1e-12)
    return start + int(hits[0]) if len(hits) else len(cumulative) - 1


def fit_elastic(points: list[tuple[int, float]], minimum: int = 1, cover: bool = True) -> Elastic:
    """A size ``a + b*N`` through per-length sizes ``(N, size)``.

    One length gives ``b = 0`` (a token count that does not grow with ``N``: the safe
    reading of a single measurement). Several give the least-squares line with ``b >= 0``;
    with ``cover`` it is raised until it reaches every point, so a size that met the
    recall at each calibration length still does.
    """
    ns = torch.tensor([float(n) for n, _ in points], dtype=torch.float64)
    sizes = torch.tensor([float(s) for _, s in points], dtype=torch.float64)
    if len(set(ns.tolist())) < 2:
        a, b = float(sizes.max() if cover else sizes.mean()), 0.0
    else:
        b = float(((ns - ns.mean()) * (sizes - sizes.mean())).sum() / ((ns - ns.mean()) ** 2).sum())
        b = round(max(b, 0.0), 8)
        residual = sizes - b * ns
        a = float(residual.max() if cover else residual.mean())
    a = math.ceil(a * 1000 - 1e-6) / 1000 if cover else round(a, 3)
    return Elastic(a, b, minimum)


def worst_recall(pattern: Pattern, profiles: list[AttentionProfile], params: dict) -> float:
    """The pattern's lowest recall over the calibration lengths, within [0, 1] (float
    sums of a row's probabilities can exceed 1 by rounding)."""
    return min(1.0, max(0.0, min(pattern.recall(profile, params) for profile in profiles)))


def union_recall(first, second, overlap, total):
    """Mass of a union from its parts (tensors or numbers), the estimated overlap kept within
    the bounds every union obeys: at least the larger part, at most the sum and the total."""
    first, second, overlap = (torch.as_tensor(x, dtype=torch.float64) for x in (first, second, overlap))
    upper = torch.minimum(first + second, torch.as_tensor(total, dtype=torch.float64))
    return torch.minimum(torch.maximum(first + second - overlap, torch.maximum(first, second)), upper)


def cheapest(candidates: list[tuple[float, float, object]], recall: float) -> object:
    """From ``(recall, cost, choice)`` triples: the cheapest choice reaching ``recall``,
    else the one with the highest recall."""
    meeting = [c for c in candidates if c[0] >= recall - 1e-12]
    if meeting:
        return min(meeting, key=lambda c: c[1])[2]
    return max(candidates, key=lambda c: (c[0], -c[1]))[2]


def period_candidates(mass: torch.Tensor, limit: int = 4) -> list[int]:
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
