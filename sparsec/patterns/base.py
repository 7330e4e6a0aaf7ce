"""The pattern interface and helpers shared by every pattern family.

Conventions (every kernel and the reference follow them):

- Queries ``i`` in ``[0, n_q)``, keys ``j`` in ``[0, n_k)``. Queries are aligned to the
  bottom-right of the score matrix, as in FlashAttention: query ``i`` sits at key position
  ``i + (n_k - n_q)``, and its *offset* to key ``j`` is ``d = i + (n_k - n_q) - j``.
  The main diagonal is ``d == 0``; causal attention keeps ``d >= 0``.
- A pattern's mask says which (query, key) pairs it computes, causal restriction included.
  Every pattern but ``skip`` keeps the diagonal, so no query row is ever empty.
- Sizes are *elastic* in the sequence length: ``Elastic(a, b)`` means ``round(a + b*N)``
  tokens with ``N = n_k``, so one plan serves any length. JSON form: ``[a, b]``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy
import torch

if TYPE_CHECKING:
    from .fitting import AttentionProfile

# The sequence length of symbolic costs (``n_q = n_k = N``).
N = sympy.Symbol("N", positive=True, integer=True)


def full_pairs(n, causal: bool):
    """Pairs of the full score matrix at ``n_q = n_k = n`` (numbers or sympy)."""
    return n * (n + 1) / 2 if causal else n * n


@dataclass(frozen=True)
class Elastic:
    """A size ``a + b*N`` in tokens, at least ``minimum``."""

    a: float
    b: float = 0.0
    minimum: int = 1

    def at(self, n: int) -> int:
        return max(self.minimum, int(round(self.a + self.b * n)))

    def to_json(self) -> list:
        return [self.a, self.b]

    def expr(self) -> sympy.Expr:
        """The size as a sympy expression in :data:`N`, unrounded."""
        return sympy.Max(self.minimum, _rational(self.a) + _rational(self.b) * N)

    @staticmethod
    def from_json(value: Any, minimum: int = 1) -> "Elastic":
        if isinstance(value, Elastic):
            return value
        if isinstance(value, (int, float)):
            return Elastic(float(value), 0.0, minimum)
        a, b = value
        return Elastic(float(a), float(b), minimum)

    @staticmethod
    def widest(first: Any, second: Any) -> list:
        """JSON of a size at least as large as both at every ``N`` (the larger ``a`` and ``b``)."""
        x, y = Elastic.from_json(first), Elastic.from_json(second)
        return [_plain(max(x.a, y.a)), _plain(max(x.b, y.b))]

    def __str__(self) -> str:
        a = int(self.a) if float(self.a).is_integer() else round(self.a, 2)
        return f"{a}" if self.b == 0 else f"{a}+{self.b:.3g}N"


# ``site.extra`` key: the width of the causal sliding window the model itself builds at
# this site (written by fold_causal_mask when it replaces that mask by ``causal=True``).
MODEL_WINDOW = "model_window"

# Additive mask values at or below this count as masked (``finfo.min``-style padding masks):
# calibration's padding rows, the vertical_slash estimate and the mask probes all read it.
MASKED_ADDITIVE = -1e4


def baseline_pattern(site) -> tuple[str, dict]:
    """The least sparse pattern a head of ``site`` (an :class:`~sparsec.plan.AttentionSite`)
    may take: ``("dense", {})``, or ``("window", {"window": [w, 0]})`` where the site's
    in-graph sliding-window mask of width ``w`` was replaced by ``causal=True``
    (``site.extra["model_window"]``): there a dense head would attend outside the model's
    window. Whatever makes a head "dense again" (search back-off, verification) must use
    this instead."""
    width = site.extra.get(MODEL_WINDOW)
    if width is None:
        return "dense", {}
    return "window", {"window": [int(width), 0]}


def _plain(x: float) -> "int | float":
    """Whole numbers as ints, so equal sizes print (and group) alike: ``[4, 0]``, not ``[4.0, 0.0]``."""
    return int(x) if float(x).is_integer() else float(x)


def _rational(x: float) -> sympy.Rational:
    return sympy.Rational(repr(float(x)))


def offsets(rows: torch.Tensor, cols: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """``d[i, j] = i + (n_k - n_q) - j`` for the given query rows and key columns."""
    return rows[:, None] + (n_k - n_q) - cols[None, :]


class Pattern:
    """One pattern family. Subclasses set ``kind`` and implement ``keep``.

    ``keep(params, d, rows, cols, n_q, n_k)`` returns the boolean mask of kept pairs for
    the query ``rows`` and key ``cols`` (``d`` is their offset matrix), *before* the causal
    restriction, which :meth:`mask` applies.
    """

    kind: str = ""
    dynamic: bool = False          # True when the mask depends on the input (vertical_slash)

    def keep(self, params: dict, d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
             n_q: int, n_k: int) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, params: dict, n_q: int, n_k: int, causal: bool,
             rows: torch.Tensor | None = None, device: "torch.device | str" = "cpu") -> torch.Tensor:
        """Boolean ``[len(rows), n_k]`` mask of the pairs this pattern computes."""
        if rows is None:
            rows = torch.arange(n_q, device=device)
        cols = torch.arange(n_k, device=rows.device)
        d = offsets(rows, cols, n_q, n_k)
        kept = self.keep(params, d, rows, cols, n_q, n_k)
        return kept & (d >= 0) if causal else kept

    def block_layout(self, params: dict, n_q: int, n_k: int, causal: bool,
                     block_m: int, block_n: int) -> torch.Tensor:
        """Boolean ``[ceil(n_q/block_m), ceil(n_k/block_n)]``: blocks holding any kept pair."""
        nbq, nbk = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
        layout = torch.zeros(nbq, nbk, dtype=torch.bool)
        for qb in range(nbq):
            rows = torch.arange(qb * block_m, min((qb + 1) * block_m, n_q))
            m = self.mask(params, n_q, n_k, causal, rows=rows)
            pad = nbk * block_n - n_k
            m = torch.nn.functional.pad(m, (0, pad)).view(len(rows), nbk, block_n)
            layout[qb] = m.any(dim=2).any(dim=0)
        return layout

    def kept_pairs(self, params: dict, n_q: int, n_k: int, causal: bool, chunk: int = 1024) -> int:
        """Number of (query, key) pairs the pattern computes, counted in query chunks."""
        total = 0
        for start in range(0, n_q, chunk):
            rows = torch.arange(start, min(start + chunk, n_q))
            total += int(self.mask(params, n_q, n_k, causal, rows=rows).sum())
        return total

    def pairs(self, params: dict, n: int, causal: bool) -> float:
        """Pairs the pattern computes at ``n_q = n_k = n``. Families override this with a
        closed form (the generic count builds the mask, which is slow at large ``n``)."""
        return self.kept_pairs(params, n, n, causal)

    def density(self, params: dict, n: int, causal: bool) -> float:
        """Fraction of the (causal) score matrix at length ``n`` that the pattern computes."""
        return self.pairs(params, n, causal) / full_pairs(n, causal)

    # -- cost and fit (see patterns/fitting.py for the statistics they read) --

    def pairs_expr(self, params: dict, causal: bool) -> sympy.Expr:
        """Pairs computed at ``n_q = n_k = N``, as a sympy expression in :data:`N`.

        Elastic sizes enter unrounded (``a + b*N``)."""
        raise NotImplementedError(f"{self.kind} has no symbolic pair count")

    def overhead_expr(self, params: dict, head_dim: int) -> sympy.Expr:
        """FLOPs a pattern spends besides its pairs (e.g. estimating a dynamic pattern)."""
        return sympy.Integer(0)

    def cost_expr(self, params: dict, causal: bool, head_dim: int) -> sympy.Expr:
        """FLOPs of one head at length ``N``: ``4*head_dim`` per computed (query, key) pair
        (``2*head_dim`` for q.k, ``2*head_dim`` for p.v) plus :meth:`overhead_expr`;
        softmax and memory traffic are left to the target cost model."""
        return 4 * head_dim * self.pairs_expr(params, causal) + self.overhead_expr(params, head_dim)

    def cost(self, params: dict, n: int, causal: bool, head_dim: int) -> float:
        """:meth:`cost_expr` at ``N = n``, with the exact pair count (sizes rounded)."""
        return 4 * head_dim * float(self.pairs(params, n, causal)) + float(
            self.overhead_expr(params, head_dim).subs(N, n))

    def recall(self, profile: "AttentionProfile", params: dict) -> float:
        """Fraction of one head's calibration attention mass inside the pattern, from its
        :class:`~sparsec.patterns.fitting.AttentionProfile` at one length."""
        raise NotImplementedError(f"{self.kind} cannot measure recall")

    def fit(self, profiles: "list[AttentionProfile]", recall: float) -> tuple[dict, float]:
        """The cheapest parameters whose recall reaches ``recall`` on one head's profiles
        (one per calibration length, shortest first), or the best this family can do.

        Returns ``(params, measured recall)``; the measured recall is the lowest over the
        calibration lengths."""
        raise NotImplementedError(f"{self.kind} has no fit")

    def merge(self, first: dict, second: dict) -> dict | None:
        """Parameters whose mask holds both ``first``'s and ``second``'s at every length (so a
        head keeps at least its recall), for running two head groups as one launch; None
        when the family has no such union (the default)."""
        return None

    def describe(self, params: dict) -> str:
        """Short human-readable parameters, for plan summaries."""
        return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value):
        return str(Elastic.from_json(value))
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} items]"
    return str(value)


# -- pattern instances: equal canonical parameters mean equal masks at every length --

_ELASTIC = {"window", "sink", "vertical", "slash", "period", "width"}
_INDEX_LISTS = {"columns", "blocks"}


def _number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    return int(x) if float(x).is_integer() else float(x)


def _canonical_value(key: str, value):
    if key in _ELASTIC and isinstance(value, (int, float, list)):
        size = Elastic.from_json(value)
        a = round(size.a) if size.b == 0 else size.a       # as Elastic.at rounds: same mask
        return [_number(a), _number(size.b)]
    if key in _INDEX_LISTS and isinstance(value, list):
        items = {json.dumps(_canonical_value("", v)) for v in value}
        return sorted((json.loads(v) for v in items), key=lambda v: (v if isinstance(v, list) else [v]))
    if isinstance(value, list):
        return [_canonical_value("", v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical_value(k, v) for k, v in value.items()}
    return _number(value)


def canonical_params(params: dict) -> dict:
    """Parameters in a normal form (numbers normalised, a length-independent size rounded to
    whole tokens as :meth:`Elastic.at` does, index lists sorted): equal normal forms mean
    equal masks."""
    return {k: _canonical_value(k, v) for k, v in sorted(params.items())}


def instance_key(kind: str, params: dict) -> str:
    """The one key for "same pattern instance": heads with equal keys run as one group."""
    return kind + json.dumps(canonical_params(params), sort_keys=True)



_REGISTRY: dict[str, Pattern] = {}


def register(pattern_cls: type[Pattern]) -> type[Pattern]:
    _REGISTRY[pattern_cls.kind] = pattern_cls()
    return pattern_cls


def get_pattern(kind: str) -> Pattern:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown pattern kind {kind!r}; known kinds: {sorted(_REGISTRY)}") from None


def pattern_kinds() -> list[str]:
    return list(_REGISTRY)
