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

import math
from dataclasses import dataclass
from typing import Any

import torch


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

    @staticmethod
    def from_json(value: Any, minimum: int = 1) -> "Elastic":
        if isinstance(value, Elastic):
            return value
        if isinstance(value, (int, float)):
            return Elastic(float(value), 0.0, minimum)
        a, b = value
        return Elastic(float(a), float(b), minimum)

    def __str__(self) -> str:
        a = int(self.a) if float(self.a).is_integer() else round(self.a, 2)
        return f"{a}" if self.b == 0 else f"{a}+{self.b:.3g}N"


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

    def density(self, params: dict, n: int, causal: bool) -> float:
        """Fraction of the (causal) score matrix at length ``n`` that the pattern computes."""
        full = n * (n + 1) // 2 if causal else n * n
        return self.kept_pairs(params, n, n, causal) / full

    def describe(self, params: dict) -> str:
        """Short human-readable parameters, for plan summaries."""
        return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value):
        return str(Elastic.from_json(value))
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} items]"
    return str(value)


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
