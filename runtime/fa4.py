"""FlashAttention-4 (CuTe DSL, ``flash_attn.cute``) backend of ``sparse_attention`` on sm90+.

One launch per attention site. Every head the backend serves runs in one ``flash_attn.cute``
call with per-head block-sparse tensors (``BlockSparseTensorsTorch``): for each (batch,
head, query block) the key blocks its pattern keeps entirely (FULL: no mask evaluated) and
those it keeps in part (PARTIAL: the mask_mod decides), classified exactly from the
pattern's own mask by :meth:`~sparsec.patterns.Pattern.block_classes`, causal cut
included. Key blocks a head keeps nothing of are not listed, so a ``skip`` head, or a head
another backend serves, gets zero rows here and is overwritten by that backend afterwards.

The mask_mod is one function for every static family. FA4 takes a single mask_mod per
call, so instead of one mask per group each head's *terms* are a row of an int32 aux
table (window, sink, diagonal bands, a stripe-column row, a block-layout row); the mask is
their union, then the causal cut (a mask_mod replaces FA4's own causal mask). The kernel
evaluates only the terms some head of the site uses (:class:`MaskForm`), so a few compiled
kernels per head dim and dtype serve every plan, and heads of different groups share the
launch. A head whose mask keeps all or nothing of every block carries it in the block
tables alone (no term: a block_topk layout on the block grid). Each family's terms are its
``"fa4"`` piece in the pattern registry (:func:`family_terms`).

Two cheaper forms where the site allows them:
- one sliding-band group over every head (``Pattern.native_window``): FA4's native
  ``window_size`` (no tables, no mask_mod, GQA packed);
- one group over every head: its tables broadcast over heads, so ``pack_gqa`` stays on
  (FA4 turns it off for per-head tables).

The mask (:func:`site_keeps`: the arithmetic terms, the table lookups, then the causal cut)
is index arithmetic and table reads on values that support ``+ - * // < <= & |``: the same
function is the kernel's mask_mod on CuTe ``TensorSSA`` values and :func:`torch_mask` on
torch index tensors (the CPU tests, against each family's reference mask).

Pinned to ``flash-attn-4==4.0.0b36`` (the ``sparsec[gpu]`` extra): ``_flash_attn_fwd`` (to
write into sparsec's output buffer) and the sm90 tile rule are that version's internals.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from sparsec.analysis.cost_model import FA4_BLOCK_M
from sparsec.ir import config
from sparsec.patterns import get_pattern
from sparsec.patterns.base import backend_piece, register_piece
from sparsec.patterns.shared import size_at
from sparsec.ir.plan import HeadGroup
from sparsec.ir.targets import running_target

BLOCK_M = FA4_BLOCK_M          # query rows per sparse block (a multiple of every FA4 sm90 tile_m we use)
FA4_DTYPES = (torch.float16, torch.bfloat16)

# Columns of the per-head aux table the mask_mod reads.
WINDOW, SINK, PERIOD, BAND, LAST_DIAGONAL, BLOCK, OFFSET = range(7)
STRIPE_ROW, HAS_STRIPES, LAYOUT_ROW, HAS_LAYOUT = range(7, 11)
TABLE_COLUMNS = 11
# The columns a kernel may hold as literals (MaskForm.fixed) instead of reading them per score.
SCALAR_COLUMNS = (WINDOW, SINK, PERIOD, BAND, LAST_DIAGONAL, OFFSET)


# -- per-family terms -----------------------------------------------------------------------

@dataclass
class HeadTerms:
    """The mask of one head as a union of index-arithmetic terms, at one length.

    ``window``: keep ``|d| < window``; ``sink``: keep keys ``k < sink``; ``period``, ``band``,
    ``last_diagonal``: keep ``|d|`` within ``band`` of its nearest diagonal ``m * period``
    with ``|m| <= last_diagonal``; ``columns``: keys every query keeps; ``layout``:
    ``(block, [blocks_q, blocks_k] bool)``, keep ``(q // block, k // block)`` where set or
    where the key block holds the query's diagonal position.
    """

    window: int = 0
    sink: int = 0
    period: int = 1
    band: int = 0
    last_diagonal: int = 0
    columns: tuple[int, ...] = ()
    layout: "tuple[int, torch.Tensor] | None" = None

    def scalars(self, n_q: int, n_k: int) -> dict[int, int]:
        """The head's :data:`SCALAR_COLUMNS` values at ``(n_q, n_k)``."""
        return {WINDOW: self.window, SINK: self.sink, PERIOD: self.period, BAND: self.band,
                LAST_DIAGONAL: self.last_diagonal, OFFSET: n_k - n_q}


def _one_group_over_all(groups: list[HeadGroup], num_heads: int) -> bool:
    """The site runs a single group covering every head (one table serves them all)."""
    return len(groups) == 1 and sorted(groups[0].heads) == list(range(num_heads))


@register_piece("fa4", "dense")
def _dense_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=n_q + n_k)


@register_piece("fa4", "skip")
def _skip_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms()


@register_piece("fa4", "window")
def _window_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=size_at(params, "window", n_k))


@register_piece("fa4", "sink_window")
def _sink_window_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=size_at(params, "window", n_k), sink=size_at(params, "sink", n_k))


@register_piece("fa4", "multi_diagonal")
def _multi_diagonal_terms(params, n_q, n_k) -> HeadTerms:
    count = int(params.get("count", 0))
    # count 0 keeps every diagonal: no diagonal index reaches n_q + n_k.
    return HeadTerms(period=size_at(params, "period", n_k), band=size_at(params, "width", n_k),
                     last_diagonal=count - 1 if count > 0 else n_q + n_k)


@register_piece("fa4", "vertical_stripe")
def _vertical_stripe_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=size_at(params, "window", n_k),
                     columns=tuple(sorted({int(c) for c in params["columns"] if c < n_k})))


@register_piece("fa4", "block_topk")
def _block_topk_terms(params, n_q, n_k) -> HeadTerms:
    block = int(params["block"])
    # The calibration layout stretched to this length; the per-row diagonal block is the
    # mask_mod's own term (_block_diagonal).
    return HeadTerms(layout=(block, get_pattern("block_topk").stretched_layout(params, n_q, n_k)))


def family_terms(kind: str) -> "Callable[[dict, int, int], HeadTerms] | None":
    """Family ``kind``'s FA4 piece (its mask as :class:`HeadTerms` at ``(params, n_q, n_k)``),
    registered above through the pattern registry; None for families FA4 does not serve
    (dynamic ones, estimated per input, stay on the Triton kernels)."""
    return backend_piece("fa4", kind)


# -- the mask arithmetic (torch tensors and CuTe TensorSSA alike) -----------------------------

def _near_diagonal(a, period, band, last, const):
    """``a >= 0`` within ``band`` of its nearest kept diagonal ``m * period``, ``m <= last``
    (the nearest diagonal rounded half up, clamped to the last kept one)."""
    nearest = (const(2) * a + period) // (const(2) * period)
    inner = (nearest <= last) & (a - nearest * period < band) & (nearest * period - a < band)
    return inner | ((nearest > last) & (a - last * period < band))


def _band(d, window, causal: bool, const):
    """``|d| < window``; ``d < window`` where the causal cut (``d >= 0``) follows anyway."""
    return d < window if causal else (d < window) & (const(0) - d < window)


def _diagonal_bands(d, period, band, last, const):
    """``|d|`` within ``band`` of a kept diagonal (see :class:`HeadTerms`); without abs (CuTe
    values have none): each sign of ``d`` separately."""
    zero = const(0)
    kept = (d >= zero) & _near_diagonal(d, period, band, last, const)
    return kept | ((d < zero) & _near_diagonal(zero - d, period, band, last, const))


def _block_diagonal(q, k, offset, block):
    """Key ``k`` lies in the block that holds query ``q``'s diagonal position."""
    return k // block == (q + offset) // block


@dataclass(frozen=True)
class MaskForm:
    """What one site's mask_mod evaluates: one compiled kernel per form, head dim and dtype.
    A term no served head uses is left out of the kernel (a 16k block_topk site without its
    layout lookup: 0.76 ms instead of 0.94 on the H200). ``fixed``: ``(column, value)`` pairs
    of the table that every served head shares, held in the kernel as literals instead of
    read per score (sink_window at 16k: 0.44 ms so, 0.49 read from the table; FA4's
    ``aux_scalars`` would do it without a kernel per value, but flash-attn-4 4.0.0b36's sm90
    kernel does not compile with them, an internal compiler error)."""

    causal: bool
    band: bool = True            # a window or sink that cuts (a window of n_q + n_k keeps every key)
    diagonals: bool = False
    stripes: bool = False
    layout: bool = False
    fixed: tuple[tuple[int, int], ...] = ()

    @property
    def reads_tables(self) -> bool:
        """Whether the mask reads the aux tables at all (else FA4 is called without them)."""
        used = {OFFSET} | ({WINDOW, SINK} if self.band else set()) | \
            ({PERIOD, BAND, LAST_DIAGONAL} if self.diagonals else set())
        return self.stripes or self.layout or not used <= {column for column, _ in self.fixed}


def site_keeps(head, q, k, aux_tensors, form: MaskForm, element, const):
    """Whether query ``q`` keeps key ``k`` in ``head``: the union of the head's terms that
    ``form`` names (window and sink, diagonal bands, stripe column, layout cell), read from
    its row of ``aux_tensors = (table, columns, layouts)`` (see :class:`SiteTables`), then
    the causal cut, last, so that it cuts the looked-up terms too.

    The kernel's mask_mod and :func:`torch_mask` are both this function. ``element`` turns
    an index value into a subscript (``x[0]`` of a one-element CuTe ``TensorSSA``, a torch
    index tensor as it is); ``const`` lifts a Python int or a table read to the values' kind.
    ``aux_tensors`` may be None where the form reads no table (:attr:`MaskForm.reads_tables`).
    """
    table, columns, layouts = aux_tensors[:3] if form.reads_tables else (None, None, None)
    fixed = dict(form.fixed)

    def field(column):
        return const(fixed[column] if column in fixed else table[head, column])

    offset = field(OFFSET)
    d = q + offset - k
    terms = []
    if form.band:
        terms.append(_band(d, field(WINDOW), form.causal, const) | (k < field(SINK)))
    if form.diagonals:
        terms.append(_diagonal_bands(d, field(PERIOD), field(BAND), field(LAST_DIAGONAL), const))
    if form.stripes:
        stripe = const(columns[table[head, STRIPE_ROW], element(k)])
        terms.append((field(HAS_STRIPES) > const(0)) & (stripe > const(0)))
    if form.layout:
        block = table[head, BLOCK]
        cell = const(layouts[table[head, LAYOUT_ROW], element(q) // block, element(k) // block])
        hit = (cell > const(0)) | _block_diagonal(q, k, offset, const(block))
        terms.append((field(HAS_LAYOUT) > const(0)) & hit)
    kept = terms[0] if terms else k >= const(0)          # no term: every key (before the cut)
    for term in terms[1:]:
        kept = kept | term
    return kept & (d >= const(0)) if form.causal else kept


# -- the tables of one site -----------------------------------------------------------------

@dataclass
class SiteTables:
    """Everything one FA4 call of a site needs besides q, k, v (built once per signature)."""

    table: torch.Tensor                  # int32 [heads, TABLE_COLUMNS]
    columns: torch.Tensor                # int32 [stripe rows, n_k] (1 x 2 when no head has stripes)
    layouts: torch.Tensor                # int32 [layout rows, blocks_q, blocks_k] (1 x 1 x 2 when none)
    partial_count: torch.Tensor          # int32 [1, heads or 1, query blocks]
    partial_index: torch.Tensor          # int32 [1, heads or 1, query blocks, key blocks]
    full_count: torch.Tensor
    full_index: torch.Tensor
    block_n: int
    form: MaskForm

    @property
    def aux_tensors(self) -> list[torch.Tensor]:
        """The mask_mod's aux tensors, in the order :func:`site_keeps` reads them."""
        return [self.table, self.columns, self.layouts]


def _mask_form(table: torch.Tensor, served: list[int], causal: bool, n_q: int, n_k: int,
               fixed: tuple[tuple[int, int], ...]) -> MaskForm:
    """The terms the served heads' rows of ``table`` use."""
    rows = table[served]
    return MaskForm(causal=causal, band=bool((rows[:, WINDOW] < n_q + n_k).any()),
                    diagonals=bool(rows[:, BAND].any()), stripes=bool(rows[:, HAS_STRIPES].any()),
                    layout=bool(rows[:, HAS_LAYOUT].any()), fixed=fixed)


def _fixed_scalars(terms_at: Callable[[int, int, int], HeadTerms], count: int, n_q: int,
                   n_k: int) -> tuple[tuple[int, int], ...]:
    """The scalar columns the ``count`` groups' terms (``terms_at(i, n_q, n_k)``) share at
    ``(n_q, n_k)`` and at twice that length: a value that changes with the length stays a table
    read, so serving many lengths does not compile a kernel for each."""
    rows = [terms_at(i, n, m).scalars(n, m) for i in range(count) for n, m in ((n_q, n_k), (2 * n_q, 2 * n_k))]
    return tuple((column, rows[0][column]) for column in SCALAR_COLUMNS if len({row[column] for row in rows}) == 1)


def head_terms(group: HeadGroup, n_q: int, n_k: int) -> HeadTerms:
    """The terms of a group's heads at ``(n_q, n_k)``."""
    return family_terms(group.pattern)(group.params, n_q, n_k)


def build_tables(groups: list[HeadGroup], num_heads: int, n_q: int, n_k: int, causal: bool, block_n: int,
                 device: torch.device) -> SiteTables:
    """Per-head aux table and block-sparse tensors of the heads in ``groups`` (every group
    must have FA4 terms); heads in no group keep nothing here. When one group covers every
    head, the block tensors have one head row (broadcast), which keeps GQA packing on."""
    n_qb, n_kb = math.ceil(n_q / BLOCK_M), math.ceil(n_k / block_n)
    # FA4 evaluates the mask_mod on whole tiles and brings padded rows and keys back into range
    # only in a row's first block (mask.py apply_mask, wrap_aux_indices), so the lookups cover
    # the padded grid, and every head reads them (the HAS_ flags gate the values, not the reads).
    padded_q, padded_k = n_qb * BLOCK_M, n_kb * block_n
    table = torch.zeros(num_heads, TABLE_COLUMNS, dtype=torch.int32)
    table[:, PERIOD] = 1
    table[:, BLOCK] = max(padded_q, padded_k)           # a head without a layout reads cell (0, 0)
    table[:, OFFSET] = n_k - n_q
    # A mask that keeps all or nothing of every block before the causal cut is carried by the
    # block tables alone: its mask_mod terms are dense's, so partial blocks evaluate the causal
    # cut only (a block_topk layout on the block grid needs no lookup).
    by_blocks = [_block_constant(get_pattern(g.pattern), g.params, n_q, n_k, block_n, device) for g in groups]

    def terms_at(i: int, n: int, m: int) -> HeadTerms:
        return _dense_terms(groups[i].params, n, m) if by_blocks[i] else head_terms(groups[i], n, m)

    stripe_rows, layout_rows = [], []
    shared = _one_group_over_all(groups, num_heads)
    any_kept = torch.zeros(1 if shared else num_heads, n_qb, n_kb, dtype=torch.bool, device=device)
    all_kept = torch.zeros_like(any_kept)
    for i, group in enumerate(groups):
        some, every = get_pattern(group.pattern).block_classes(group.params, n_q, n_k, causal, BLOCK_M, block_n,
                                                               device)
        rows = [0] if shared else group.heads
        any_kept[rows], all_kept[rows] = some, every
        terms = terms_at(i, n_q, n_k)
        heads = torch.tensor(group.heads, dtype=torch.long)
        for column, value in terms.scalars(n_q, n_k).items():
            table[heads, column] = value
        if terms.columns:
            row = torch.zeros(padded_k, dtype=torch.int32)
            row[list(terms.columns)] = 1
            table[heads, STRIPE_ROW], table[heads, HAS_STRIPES] = len(stripe_rows), 1
            stripe_rows.append(row)
        if terms.layout is not None:
            block, layout = terms.layout
            table[heads, BLOCK], table[heads, LAYOUT_ROW], table[heads, HAS_LAYOUT] = block, len(layout_rows), 1
            layout_rows.append((block, layout))
    # Unused lookups get a 1 x 2 placeholder: FA4 needs one unique stride-1 dim per aux tensor.
    columns = torch.stack(stripe_rows) if stripe_rows else torch.zeros(1, 2, dtype=torch.int32)
    layouts = _stack_padded(layout_rows, padded_q, padded_k)
    partial_count, partial_index = _compact(any_kept & ~all_kept)
    full_count, full_index = _compact(all_kept)
    form = _mask_form(table, sorted(h for group in groups for h in group.heads), causal, n_q, n_k,
                      _fixed_scalars(terms_at, len(groups), n_q, n_k))
    return SiteTables(table.to(device), columns.to(device), layouts.to(device), partial_count, partial_index,
                      full_count, full_index, block_n, form)


def _block_constant(pattern, params: dict, n_q: int, n_k: int, block_n: int, device) -> bool:
    """Whether ``pattern`` without the causal cut keeps every pair or none of each block."""
    some, every = pattern.block_classes(params, n_q, n_k, False, BLOCK_M, block_n, device, keys_in_range_only=True)
    return torch.equal(some, every)


def _stack_padded(layouts: list[tuple[int, torch.Tensor]], padded_q: int, padded_k: int) -> torch.Tensor:
    """``(block, layout)`` pairs as one zero-padded int32 stack whose every layout covers the
    ``padded_q x padded_k`` grid at its own block."""
    if not layouts:
        return torch.zeros(1, 1, 2, dtype=torch.int32)
    rows = max(max(layout.shape[0], math.ceil(padded_q / block)) for block, layout in layouts)
    cols = max(max(layout.shape[1], math.ceil(padded_k / block)) for block, layout in layouts)
    stacked = torch.zeros(len(layouts), rows, cols, dtype=torch.int32)
    for i, (_, layout) in enumerate(layouts):
        stacked[i, : layout.shape[0], : layout.shape[1]] = layout.to(torch.int32)
    return stacked


def _compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[H, M, N]`` bool -> (counts ``[1, H, M]``, key-block indices ``[1, H, M, N]``,
    kept ones first in ascending order), int32 as FA4 takes them."""
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    return counts[None].contiguous(), order.to(torch.int32)[None].contiguous()


# -- the torch mask_mod (tests; the oracle of the CuTe one) -----------------------------------

def torch_mask(tables: SiteTables, head: int, n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    """The ``[n_q, n_k]`` mask the kernel's mask_mod computes for ``head``, in torch."""
    q = torch.arange(n_q)[:, None]
    k = torch.arange(n_k)[None, :]
    aux_tensors = [t.cpu() for t in tables.aux_tensors]
    return site_keeps(head, q, k, aux_tensors, tables.form, element=lambda index: index, const=lambda value: value)


def kernel_mask(tables: SiteTables, head: int, n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    """The ``[n_q, n_k]`` mask the kernel computes for ``head``: its full blocks, and its
    partial blocks through the mask_mod."""
    partial = tables_mask(tables, head, n_q, n_k, full=False)
    return tables_mask(tables, head, n_q, n_k, full=True) | (partial & torch_mask(tables, head, n_q, n_k, causal))


def tables_mask(tables: SiteTables, head: int, n_q: int, n_k: int, full: bool) -> torch.Tensor:
    """The ``[n_q, n_k]`` token mask of the key blocks listed for ``head`` (full or partial)."""
    counts, index = (tables.full_count, tables.full_index) if full else (tables.partial_count, tables.partial_index)
    row = min(head, counts.shape[1] - 1)
    counts, index = counts[0, row].cpu(), index[0, row].cpu()
    blocks = torch.zeros(index.shape, dtype=torch.bool)
    for query_block in range(index.shape[0]):
        blocks[query_block, index[query_block, : counts[query_block]].long()] = True
    tokens = blocks.repeat_interleave(BLOCK_M, 0).repeat_interleave(tables.block_n, 1)
    return tokens[:n_q, :n_k]


# -- FA4 ------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _interface():
    """``flash_attn.cute.interface`` and the CuTe modules, or None when FA4 is not installed."""
    try:
        import cutlass
        import cutlass.cute as cute
        from flash_attn.cute import interface, utils
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception:            # ImportError, or a CUDA / CuTe library that fails to load
        return None
    return {"cutlass": cutlass, "cute": cute, "interface": interface, "utils": utils,
            "BlockSparseTensorsTorch": BlockSparseTensorsTorch}


def interface():
    """``flash_attn.cute.interface`` (FA4 must be available)."""
    return _interface()["interface"]


# On unless SPARSEC_FA4=0 (then every group runs sparsec's Triton kernels); the benchmark
# flips it for its per-backend columns.
ENABLED = config.fa4_backend()


def supported(device: torch.device) -> bool:
    """FA4 can run on this device: CUDA, compute capability 9.0 or newer, FA4 importable."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and _interface() is not None


def available(device: torch.device) -> bool:
    """FA4 serves this device: switched on (:data:`ENABLED`) and :func:`supported`."""
    return ENABLED and supported(device)


def key_block(head_dim: int, device: torch.device) -> int:
    """The sparse key block FA4 accepts at ``head_dim``: its sm90 tile_n without mask or window
    (128, but 80 at head dim 256), 128 on newer chips (they split a block into tiles)."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return 128
    config = _interface()["interface"]._tile_size_fwd_sm90(head_dim, head_dim, False, False,
                                                           sparse_block_size_q=BLOCK_M)
    return config.n_block_size


@lru_cache(maxsize=16)
def _mask_mod(form: MaskForm):
    """The CuTe mask_mod of ``form``: :func:`site_keeps` on FA4's per-element one-value
    ``TensorSSA`` indices (mask.py ``apply_mask``)."""
    fa4 = _interface()
    cutlass, cute, utils = fa4["cutlass"], fa4["cute"], fa4["utils"]

    def const(value):
        return utils.scalar_to_ssa(value, cutlass.Int32)

    def element(index):
        return index[0]

    @cute.jit
    def sparsec_static_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        return site_keeps(head[0], q_idx, kv_idx, aux_tensors, form, element, const)
    return sparsec_static_mask


def native_window(groups: list[HeadGroup], num_heads: int, n_k: int) -> "int | None":
    """The width of FA4's native window when the site's one group runs a sliding band
    (:meth:`~sparsec.patterns.Pattern.native_window`) over every head, else None."""
    if not _one_group_over_all(groups, num_heads):
        return None
    return get_pattern(groups[0].pattern).native_window(groups[0].params, n_k)


def site_call(q, k, v, scale: float, causal: bool, groups: list[HeadGroup]) -> Callable[..., None]:
    """``launch(q, k, v, out)``: one FA4 call for ``groups`` of this input signature, writing
    their heads of the contiguous ``[B, H, n_q, D]`` ``out`` (and zeros in the other heads)."""
    fa4 = _interface()
    interface = fa4["interface"]
    num_heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    width = native_window(groups, num_heads, n_k)
    if width is not None:
        window = (width - 1, 0 if causal else width - 1)

        def launch_window(q, k, v, out) -> None:
            interface._flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                      causal=causal, window_size_left=window[0], window_size_right=window[1],
                                      out=out.transpose(1, 2))
        return launch_window

    return tables_call(build_tables(groups, num_heads, n_q, n_k, causal, key_block(q.shape[-1], q.device),
                                    q.device), scale)


def tables_call(tables: SiteTables, scale: float) -> Callable[..., None]:
    """``launch(q, k, v, out)``: one FA4 call of a site's ``tables`` (their block-sparse
    tensors, and the mask_mod of their form reading their aux tensors)."""
    fa4 = _interface()
    interface = fa4["interface"]
    sparse = fa4["BlockSparseTensorsTorch"](
        mask_block_cnt=tables.partial_count, mask_block_idx=tables.partial_index,
        full_block_cnt=tables.full_count, full_block_idx=tables.full_index, block_size=(BLOCK_M, tables.block_n))
    mask_mod = _mask_mod(tables.form)
    aux = tables.aux_tensors if tables.form.reads_tables else None

    def launch(q, k, v, out) -> None:
        interface._flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                  causal=False, mask_mod=mask_mod, block_sparse_tensors=sparse, aux_tensors=aux,
                                  out=out.transpose(1, 2))
    return launch


def serves(q, k, v, mask, causal: bool, group: HeadGroup, whole_site: bool = False) -> bool:
    """Whether the FA4 backend takes ``group`` for these inputs: under a compiled model's
    target (:func:`~sparsec.ir.targets.running_target`) where its cost model picks FA4 at this
    length (``CostModel.backend``; ``whole_site``: the group is the site's only one, so a
    plain window is priced as FA4's native window), in a direct call wherever the family
    rule allows it."""
    from sparsec.analysis.cost_model import CostModel, attention_backend
    if not (mask is None and family_terms(group.pattern) is not None and q.dtype in FA4_DTYPES
            and q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1]):
        return False
    target = running_target()
    if target is None or target.arch != _arch(q.device):
        return attention_backend(_arch(q.device), group.pattern, q.shape[-1]) == "fa4"
    return CostModel(target).backend(group.pattern, group.params, k.shape[-2], causal, q.shape[-1],
                                     whole_site) == "fa4"


def _pays(q, k, causal: bool, groups: list[HeadGroup]) -> bool:
    """Under a compiled model's target, whether its cost model runs this site's groups on FA4
    at all (``CostModel.fa4_pays``: GPU and host time, against Triton for every group)."""
    from sparsec.analysis.cost_model import CostModel
    target = running_target()
    if target is None or target.arch != _arch(q.device):
        return True
    sizes = [(group.pattern, group.params, len(group.heads)) for group in groups]
    return CostModel(target).fa4_pays(sizes, k.shape[-2], causal, q.shape[-1], q.shape[0])


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


_WARNED: set[str] = set()


def site_launches(q, k, v, mask, scale: float, causal: bool, groups: list[HeadGroup]):
    """``(launches, groups left)``: the site's one FA4 launch (``launch(q, k, v, out, mask)``)
    for the groups FA4 serves, and the groups other kernels must run after it. No FA4 launch
    when FA4 does not serve the device or any group; one that FA4 refuses (a shape it cannot
    build) is dropped with one warning per reason, and every group is left to the others."""
    if not available(q.device):
        return [], groups
    whole_site = _one_group_over_all(groups, q.shape[1])
    mine = [g for g in groups if serves(q, k, v, mask, causal, g, whole_site)]
    if not mine or not _pays(q, k, causal, groups):
        return [], groups
    rest = [g for g in groups if g not in mine]
    try:
        call = site_call(q, k, v, scale, causal, mine)
        probe = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        call(q, k, v, probe)        # compiles, and proves FA4 takes the shape before it is relied on
    except Exception as error:      # whatever FA4's JIT raises (CuTe DSL errors included): fall back
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"sparsec: FlashAttention-4 refused a site at head dim {q.shape[-1]} ({reason}); "
                          "its groups run the Triton kernels", stacklevel=3)
        return [], groups
    return [lambda q, k, v, out, mask: call(q, k, v, out)], rest
