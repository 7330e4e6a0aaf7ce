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

import contextlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sympy
import torch

if TYPE_CHECKING:
    import numpy as np

    from sparsec.patterns.fitting import AttentionProfile

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
        return [_number(max(x.a, y.a)), _number(max(x.b, y.b))]

    def __str__(self) -> str:
        a = int(self.a) if float(self.a).is_integer() else round(self.a, 2)
        return f"{a}" if self.b == 0 else f"{a}+{self.b:.3g}N"


# ``site.extra`` key: the width of the causal sliding window the model itself builds at
# this site (written by fold_causal_mask when it replaces that mask by ``causal=True``).
MODEL_WINDOW = "model_window"

# Token-mask elements evaluated at once when classifying blocks.
_MASK_CHUNK = 1 << 24

# Additive mask values at or below this count as masked (``finfo.min``-style padding masks):
# calibration's padding rows, the vertical_slash estimate and the mask probes all read it.
MASKED_ADDITIVE = -1e4


def mask_4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The op's mask as a 4-D view ``[B | 1, Hq | 1, n_q | 1, n_k]``, so its head dim is dim 1.

    The op takes any mask broadcastable to ``[B, Hq, n_q, n_k]`` (as SDPA does): 2-D
    ``[n_q, n_k]``, 3-D per head ``[Hq | 1, n_q, n_k]`` or 4-D; the missing leading dims
    become size 1 (no copy)."""
    return None if mask is None else mask[(None,) * (4 - mask.dim())]


def mask_rows(mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The query rows ``rows`` of the op's mask as a 4-D view (:func:`mask_4d`); a mask
    broadcast over the rows stays as it is."""
    if mask is None:
        return None
    mask = mask_4d(mask)
    return mask if mask.shape[-2] == 1 else mask.index_select(-2, rows)


def baseline_pattern(site) -> tuple[str, dict]:
    """The least sparse pattern a head of ``site`` (an :class:`~sparsec.ir.plan.AttentionSite`)
    may take: ``("dense", {})``, or ``("window", {"window": [w, 0]})`` where the site's
    in-graph sliding-window mask of width ``w`` was replaced by ``causal=True``
    (``site.extra["model_window"]``): there a dense head would attend outside the model's
    window. Whatever makes a head "dense again" (search back-off, verification) must use
    this instead."""
    width = site.extra.get(MODEL_WINDOW)
    if width is None:
        return "dense", {}
    return "window", {"window": [int(width), 0]}


def _rational(x: float) -> sympy.Rational:
    return sympy.Rational(repr(float(x)))


def positions(start: int, stop: int, device: "torch.device | str | None" = None) -> torch.Tensor:
    """Token positions ``start .. stop - 1`` for mask arithmetic, as int32: a 2048 x 2048
    sink_window mask takes 17 ms instead of 57 in int64 on two CPU cores, and every
    position, offset and size of a mask fits (no product of two lengths is formed)."""
    return torch.arange(start, stop, dtype=torch.int32, device=device)


def offsets(rows: torch.Tensor, cols: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """``d[i, j] = i + (n_k - n_q) - j`` for the given query rows and key columns."""
    return rows[:, None] + (n_k - n_q) - cols[None, :]


class MaskOps:
    """What a family's :meth:`Pattern.index_keep` may use besides the operators ``& | ~ < <=
    > >= == != + - * // %`` (``//`` and ``%`` floor, as Python's) on the values it is given.

    Each backend subclasses it: :class:`TorchOps` (the reference mask and FlexAttention's
    mask_mod) and the ONNX decomposition's graph values.
    ``n_q`` and ``n_k`` are the lengths as backend values; :meth:`size` resolves an elastic
    size at ``N = n_k``.
    """

    n_q: Any
    n_k: Any

    def size(self, value: Any, minimum: int = 1) -> Any:
        """``Elastic.from_json(value, minimum).at(n_k)`` as a backend value."""
        raise NotImplementedError

    def where(self, condition, if_true, if_false):
        raise NotImplementedError

    def lookup(self, table: "list | torch.Tensor", index):
        """``table[index]`` of a constant 1-D table (bool or int); ``index`` is in range."""
        raise NotImplementedError

    def full(self, like, value: bool):
        """A boolean of ``like``'s shape, every element ``value`` (dense and skip)."""
        raise NotImplementedError

    def abs(self, x):
        return self.where(x < 0, 0 - x, x)

    def minimum(self, a, b):
        return self.where(a < b, a, b)

    def maximum(self, a, b):
        return self.where(a < b, b, a)


class TorchOps(MaskOps):
    """:class:`MaskOps` on torch integer tensors (and Python ints, for sizes)."""

    def __init__(self, n_q: int, n_k: int, device: "torch.device | str" = "cpu"):
        self.n_q, self.n_k, self.device = n_q, n_k, torch.device(device)
        self._tables: dict = {}        # list lookup tables as tensors, made once (see Pattern.mask_mod)

    def size(self, value, minimum=1):
        return Elastic.from_json(value, minimum).at(self.n_k)

    def where(self, condition, if_true, if_false):
        if not isinstance(condition, torch.Tensor):
            return if_true if condition else if_false
        return torch.where(condition, if_true, if_false)

    def lookup(self, table, index):
        if isinstance(table, torch.Tensor):
            return table.to(self.device)[index]
        key = tuple(table)
        if key not in self._tables:
            self._tables[key] = torch.as_tensor(table, device=self.device)
        return self._tables[key][index]

    def full(self, like, value):
        return torch.full_like(like, value, dtype=torch.bool)


class Pattern:
    """One pattern family. Subclasses set ``kind`` and spell their mask once, in
    :meth:`index_keep`; every backend evaluates that one spelling (see
    docs/pattern_families.md).

    Roles are properties, never name checks: ``computes_all`` (``dense``: plain attention),
    ``computes_none`` (``skip``: zeros), ``dynamic`` (the mask is estimated per input).
    ``elastic_params`` and ``index_list_params`` name the parameters that are elastic sizes
    and order-free index lists, for :func:`canonical_params`.
    """

    kind: str = ""
    dynamic: bool = False          # the mask depends on the input (vertical_slash)
    # Its mask is a layout taken from the calibration inputs' content and stretched to other
    # lengths (block_topk): it may hold only for inputs like those, at their length.
    layout_from_calibration: bool = False
    computes_all: bool = False     # every pair: runs plain attention (dense)
    computes_none: bool = False    # no pair: the heads' output is zero (skip)
    elastic_params: frozenset = frozenset()
    index_list_params: frozenset = frozenset()
    # The Triton template serving the family ("index", "lut", or None for no kernel) and its
    # compile-time flags. The default: the lookup-table template with the family's own token
    # mask as the kept-cell grid (see keep_grid), which serves any static family.
    triton_template: "str | None" = "lut"
    triton_flags: dict = {"KEEP_KIND": 1, "HAS_COLUMNS": False}
    # Whether its Triton kernel serves more queries than keys (cross-attention); where not,
    # those calls run the reference, with one warning.
    triton_more_queries_than_keys: bool = True

    def index_keep(self, params: dict, i, j, d, ops: MaskOps):
        """The kept pairs *before* the causal cut, as index arithmetic on query index ``i``,
        key index ``j`` and offset ``d = i + (n_k - n_q) - j`` (broadcastable backend values)
        with :class:`MaskOps` ``ops``. The one spelling of the family's mask."""
        raise NotImplementedError(f"{self.kind} has no index mask")

    def estimate_indices(self, params: dict, q: torch.Tensor, k: torch.Tensor, scale: float,
                         causal: bool, mask: torch.Tensor | None = None) -> tuple:
        """A dynamic family's estimate for ``q`` ``[B, H, n_q, D]`` and ``k`` ``[B, H, n_k, D]``
        (K heads matched to query heads) under the site's user ``mask`` (boolean or additive,
        broadcastable to ``[B, H, n_q, n_k]``): :meth:`estimate_from_rows` of the queries at
        :meth:`estimating_rows` and their mask rows. The tuple is the family's own; it goes
        back to its ``dynamic_mask(*estimate, ...)`` and backend pieces."""
        rows = self.estimating_rows(params, q.shape[-2], q.device)
        return self.estimate_from_rows(params, q.index_select(-2, rows), rows, q.shape[-2], k, scale, causal,
                                       mask_rows(mask, rows))

    def estimating_rows(self, params: dict, n_q: int, device=None) -> torch.Tensor:
        """The positions of a dynamic family's estimating queries."""
        raise NotImplementedError(f"{self.kind} is not estimated per input")

    def estimate_from_rows(self, params: dict, q_rows: torch.Tensor, rows: torch.Tensor, n_q: int,
                           k: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None = None) -> tuple:
        """:meth:`estimate_indices` from the estimating queries alone: ``q_rows`` at positions
        ``rows`` of ``n_q``, and their mask rows."""
        raise NotImplementedError(f"{self.kind} is not estimated per input")

    def mask(self, params: dict, n_q: int, n_k: int, causal: bool,
             rows: torch.Tensor | None = None, device: "torch.device | str" = "cpu",
             ops: TorchOps | None = None) -> torch.Tensor:
        """Boolean ``[len(rows), n_k]`` mask of the pairs this pattern computes (the reference).
        ``ops`` (at ``n_q, n_k`` on ``rows``' device) is shared by callers that ask for many
        row sets: its lookup tables are made once."""
        if rows is None:
            rows = positions(0, n_q, device)
        cols = positions(0, n_k, rows.device).to(rows.dtype)
        d = offsets(rows, cols, n_q, n_k)
        kept = self.index_keep(params, rows[:, None], cols[None, :], d, ops or TorchOps(n_q, n_k, rows.device))
        kept = kept.expand(d.shape)
        return kept & (d >= 0) if causal else kept

    def mask_mod(self, params: dict, n_q: int, n_k: int, causal: bool,
                 device: "torch.device | str" = "cpu"):
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of this pattern at ``(n_q, n_k)``."""
        ops = TorchOps(n_q, n_k, device)

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + (n_k - n_q) - kv_idx
            kept = self.index_keep(params, q_idx, kv_idx, d, ops)
            return kept & (d >= 0) if causal else kept
        # One eager call makes the lookup tables: FlexAttention's compiler cannot lower a tensor
        # created inside a traced mask_mod (aten.lift_fresh_copy), only one it captures.
        zero = torch.zeros((), dtype=torch.int64, device=device)
        mask_mod(zero, zero, zero, zero)
        return mask_mod

    def block_layout(self, params: dict, n_q: int, n_k: int, causal: bool,
                     block_m: int, block_n: int) -> torch.Tensor:
        """Boolean ``[ceil(n_q/block_m), ceil(n_k/block_n)]``: blocks holding any kept pair."""
        return self.block_classes(params, n_q, n_k, causal, block_m, block_n)[0]

    def block_classes(self, params: dict, n_q: int, n_k: int, causal: bool, block_m: int, block_n: int,
                      device: "torch.device | str" = "cpu", keys_in_range_only: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(partial or full, full)`` per (query block, key block): any pair kept, and every
        pair kept with every key in range (a full block needs no mask), from the token mask
        in row chunks. ``keys_in_range_only``: every pair that exists kept (keys past ``n_k``
        do not count against a full block)."""
        n_qb, n_kb = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
        rows_per_chunk = block_m * max(1, _MASK_CHUNK // (block_m * n_kb * block_n))
        any_kept = torch.zeros(n_qb, n_kb, dtype=torch.bool, device=device)
        all_kept = torch.zeros(n_qb, n_kb, dtype=torch.bool, device=device)
        for start in range(0, n_q, rows_per_chunk):
            rows = positions(start, min(start + rows_per_chunk, n_q), device)
            kept = self.mask(params, n_q, n_k, causal, rows=rows)
            blocks = math.ceil(len(rows) / block_m)
            padded = torch.zeros(blocks * block_m, n_kb * block_n, dtype=torch.bool, device=device)
            padded[: len(rows), :n_k] = kept
            tiles = padded.view(blocks, block_m, n_kb, block_n)
            qb = slice(start // block_m, start // block_m + blocks)
            any_kept[qb] = tiles.any(dim=3).any(dim=1)
            padded[len(rows):] = True                     # rows past n_q never spoil a full tile
            if keys_in_range_only:
                padded[:, n_k:] = True
            all_kept[qb] = tiles.all(dim=3).all(dim=1)
        return any_kept, all_kept

    def keep_grid(self, params: dict, n_q: int, n_k: int) -> tuple[torch.Tensor, int]:
        """``(grid, block)`` for the Triton lookup-table template's ``KEEP_KIND 1``: a pair is
        kept when its cell of ``grid`` (``block``-token cells, the grid stretched to this
        length) is, or its key block holds the diagonal. The default is the token mask
        itself (``block = 1``), exact for any family that keeps the diagonal."""
        return self.mask(params, n_q, n_k, causal=False), 1

    def split_initializer(self, params: dict) -> tuple[dict, "np.ndarray | None"]:
        """Parameters for an ONNX attribute and a bulky part that travels as an initializer
        (None when the family has none); :meth:`join_initializer` undoes it."""
        return params, None

    def join_initializer(self, params: dict, initializer: "np.ndarray") -> dict:
        return params

    def native_window(self, params: dict, n_k: int) -> "int | None":
        """The width ``w`` when this pattern's mask at ``n_k`` keys is exactly the sliding
        band ``|d| < w`` (``0 <= d < w`` after the causal cut), so a backend may run it as its
        native window (FlashAttention's ``window_size``); None otherwise (the default)."""
        return None

    def costly_pair_mask(self, params: dict, block_m: int, block_n: int) -> bool:
        """Whether a kernel that evaluates the mask per pair in ``block_m x block_n`` tiles does
        more per pair than a few index compares: a table read (stripe columns, a layout cell)
        or integer division (multi_diagonal's nearest diagonal); a mask that keeps each tile
        whole or not at all evaluates nothing (block tables carry it). The default: no."""
        return False

    def reads_bounded_keys(self, params: dict) -> bool:
        """Whether one query reads a number of keys that does not grow with the length, so
        a decode step reads only part of the cache (``attach(decode="sparse")`` keeps such
        patterns at decode). The default: no."""
        return False

    def fixed_sizes(self, params: dict, n: int) -> dict:
        """``params`` with the elastic sizes resolved at ``N = n``: this length's mask, at
        every length."""
        return {k: [Elastic.from_json(v).at(n), 0] if k in self.elastic_params else v for k, v in params.items()}

    def without_leading_keys(self, params: dict, dropped: int, n_q: int, n_k: int) -> "tuple[str, dict] | None":
        """The pattern over the keys left when the first ``dropped`` of ``n_k`` keys are gone
        (a rolling sliding-window cache): ``(kind, params)`` whose mask at ``(n_q, n_k -
        dropped)`` is this one's at ``(n_q, n_k)`` without its first ``dropped`` columns, or
        None when no parameters express it. The default serves families whose mask reads
        only offsets: the same parameters, elastic sizes resolved at ``N = n_k``. Families
        that read absolute key positions override it."""
        return self.kind, self.fixed_sizes(params, n_k)

    def cover(self, params: dict, other_kind: str, other_params: dict) -> dict | None:
        """Parameters of this family whose mask holds ``other_kind``'s mask (another family)
        and this one's at every length, or None: the cross-family rules of head merging live
        in the family that covers."""
        return None

    def kept_pairs(self, params: dict, n_q: int, n_k: int, causal: bool, chunk: int = 1024) -> int:
        """Number of (query, key) pairs the pattern computes, counted in query chunks."""
        total = 0
        for start in range(0, n_q, chunk):
            rows = positions(start, min(start + chunk, n_q))
            total += int(self.mask(params, n_q, n_k, causal, rows=rows).sum())
        return total

    def pairs(self, params: dict, n: int, causal: bool) -> float:
        """Pairs the pattern computes at ``n_q = n_k = n``. Families override this with a
        closed form (the generic count builds the mask, which is slow at large ``n``)."""
        return self.kept_pairs(params, n, n, causal)

    def chunk_padding(self, params: dict, n: int, causal: bool, rows: int) -> float:
        """Work of a kernel that runs each chunk of ``rows`` query rows over the union of its
        rows' kept keys (the CPU path), over the kept work, at ``n_q = n_k = n``. 1 where a
        chunk's rows keep about the same keys (bands and stripes: the band's spread over a
        chunk is the CPU's per-row cost)."""
        return 1.0

    def density(self, params: dict, n: int, causal: bool) -> float:
        """Fraction of the (causal) score matrix at length ``n`` that the pattern computes."""
        return self.pairs(params, n, causal) / full_pairs(n, causal)

    # -- cost and fit (see patterns/fitting.py for the statistics they read) --

    def pairs_expr(self, params: dict, causal: bool) -> sympy.Expr:
        """Pairs computed at ``n_q = n_k = N``, as a sympy expression in :data:`N`.

        Elastic sizes enter unrounded (``a + b*N``)."""
        raise NotImplementedError(f"{self.kind} has no symbolic pair count")

    def overhead_expr(self, params: dict, head_dim: int, causal: bool) -> sympy.Expr:
        """FLOPs a pattern spends besides its pairs (e.g. estimating a dynamic pattern)."""
        return sympy.Integer(0)

    def cost_expr(self, params: dict, causal: bool, head_dim: int) -> sympy.Expr:
        """FLOPs of one head at length ``N``: ``4*head_dim`` per computed (query, key) pair
        (``2*head_dim`` for q.k, ``2*head_dim`` for p.v) plus :meth:`overhead_expr`;
        softmax and memory traffic are left to the target cost model."""
        return 4 * head_dim * self.pairs_expr(params, causal) + self.overhead_expr(params, head_dim, causal)

    def cost(self, params: dict, n: int, causal: bool, head_dim: int) -> float:
        """:meth:`cost_expr` at ``N = n``, with the exact pair count (sizes rounded)."""
        return self.cost_of_pairs(float(self.pairs(params, n, causal)), params, n, causal, head_dim)

    def cost_of_pairs(self, pairs: float, params: dict, n: int, causal: bool, head_dim: int) -> float:
        """FLOPs of one head at ``N = n`` that computes ``pairs`` pairs (e.g. what a dynamic
        family's estimates kept on real inputs), its :meth:`overhead_expr` included."""
        return 4 * head_dim * pairs + float(self.overhead_expr(params, head_dim, causal).subs(N, n))

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

def _number(x):
    """Whole numbers as ints, so equal sizes print (and group) alike: ``[4, 0]``, not ``[4.0, 0.0]``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    return int(x) if float(x).is_integer() else float(x)


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _thawed(value):
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


def _canonical_value(value, family: Pattern | None = None, key: str = ""):
    if family is not None and key in family.elastic_params and isinstance(value, (int, float, list)):
        size = Elastic.from_json(value)
        a = round(size.a) if size.b == 0 else size.a       # as Elastic.at rounds: same mask
        return [_number(a), _number(size.b)]
    if family is not None and key in family.index_list_params and isinstance(value, list):
        if all(type(v) is int for v in value):      # plain token indices, the common case, at once
            return sorted(set(value))
        # Distinct items (numbers, or lists of numbers as block coordinates), sorted.
        items = {_frozen(_canonical_value(v)) for v in value}
        return [_thawed(v) for v in sorted(items, key=lambda v: v if isinstance(v, tuple) else (v,))]
    if isinstance(value, list):
        return [_canonical_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical_value(v) for k, v in value.items()}
    return _number(value)


def canonical_params(kind: str, params: dict) -> dict:
    """``kind``'s parameters in a normal form (numbers normalised; the family's elastic sizes
    that do not grow with the length rounded to whole tokens as :meth:`Elastic.at` does;
    its index lists sorted): equal normal forms mean equal masks."""
    family = get_pattern(kind)
    return {k: _canonical_value(v, family, k) for k, v in sorted(params.items())}


def instance_key(kind: str, params: dict) -> str:
    """The one key for "same pattern instance": heads with equal keys run as one group."""
    return kind + json.dumps(canonical_params(kind, params), sort_keys=True)


# -- the registry ------------------------------------------------------------------------------

_REGISTRY: dict[str, Pattern] = {}


def register(pattern_cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make ``pattern_cls`` (a :class:`Pattern` subclass) the family of its
    ``kind``. Every consumer (passes, backends, plan) finds it through :func:`get_pattern`."""
    if not pattern_cls.kind:
        raise ValueError(f"{pattern_cls.__name__} has no kind")
    _REGISTRY[pattern_cls.kind] = pattern_cls()
    return pattern_cls


def unregister(kind: str) -> None:
    """Remove the family ``kind`` (families defined for a test register and leave)."""
    _REGISTRY.pop(kind, None)


def get_pattern(kind: str) -> Pattern:
    """The registered family ``kind``; ValueError naming the known kinds otherwise."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown pattern kind {kind!r}; known kinds: {sorted(_REGISTRY)}") from None


def pattern_kinds() -> list[str]:
    """Every registered kind, in registration order (simplest first: the classification tie-break)."""
    return list(_REGISTRY)


# -- backend pieces that cannot be spelled in MaskOps (e.g. a dynamic family's estimate in ONNX) --

_PIECES: dict[tuple[str, str], Any] = {}


def register_piece(backend: str, kind: str):
    """Decorator: ``obj`` is family ``kind``'s piece of ``backend`` (``"onnx"``, ``"fa4"``, ...),
    for what a family cannot express through :meth:`Pattern.index_keep`."""
    def decorate(obj):
        _PIECES[(backend, kind)] = obj
        return obj
    return decorate


def backend_piece(backend: str, kind: str, default: Any = None) -> Any:
    """The piece registered for ``(backend, kind)``, or ``default``."""
    return _PIECES.get((backend, kind), default)


# -- what dynamic estimates kept (a dynamic family's pair count is a calibration figure) --------

_KEPT_LOGS: list[dict] = []


@contextlib.contextmanager
def kept_pairs_log():
    """Within the block, every estimate of a dynamic family that counts its pairs
    (:func:`log_kept_pairs`) adds them under its kind: the dict yielded maps kind to
    ``[kept pairs, all pairs]`` of the heads estimated (the causal cut in both), so a
    benchmark reports what the estimates kept beside the plan's figure."""
    log: dict = {}
    _KEPT_LOGS.append(log)
    try:
        yield log
    finally:
        _KEPT_LOGS.remove(log)


def logging_kept_pairs() -> bool:
    return bool(_KEPT_LOGS)


def log_kept_pairs(kind: str, kept: int, total: int) -> None:
    for log in _KEPT_LOGS:
        entry = log.setdefault(kind, [0, 0])
        entry[0] += kept
        entry[1] += total
