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
their union, then the causal cut (a mask_mod replaces FA4's own causal mask). One compiled
kernel therefore serves every plan of a head dim and dtype, and heads of different groups
share the launch. Each family's terms are its ``"fa4"`` piece in the pattern registry
(:func:`family_terms`).

Two cheaper forms where the site allows them:
- one plain ``window`` group over every head: FA4's native ``window_size`` (no tables,
  no mask_mod, GQA packed);
- one group over every head: its tables broadcast over heads, so ``pack_gqa`` stays on
  (FA4 turns it off for per-head tables).

The mask arithmetic (:func:`keep_terms`) is plain index arithmetic on values that support
``+ - * // < <= & |``: the same function runs on torch index tensors (the CPU tests, against
each family's reference mask) and on CuTe ``TensorSSA`` values inside the kernel.

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

from sparsec.patterns import Elastic, get_pattern
from sparsec.patterns.base import backend_piece, register_piece
from sparsec.plan import HeadGroup

BLOCK_M = 128                  # query rows per sparse block (a multiple of every FA4 sm90 tile_m we use)
FA4_DTYPES = (torch.float16, torch.bfloat16)

# Columns of the per-head aux table the mask_mod reads.
WINDOW, SINK, PERIOD, BAND, LAST_DIAGONAL, BLOCK, OFFSET = range(7)
STRIPE_ROW, HAS_STRIPES, LAYOUT_ROW, HAS_LAYOUT = range(7, 11)
TABLE_COLUMNS = 11


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


def _size(params: dict, name: str, n_k: int) -> int:
    return Elastic.from_json(params[name]).at(n_k)


@register_piece("fa4", "dense")
def _dense_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=n_q + n_k)


@register_piece("fa4", "skip")
def _skip_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms()


@register_piece("fa4", "window")
def _window_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=_size(params, "window", n_k))


@register_piece("fa4", "sink_window")
def _sink_window_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=_size(params, "window", n_k), sink=_size(params, "sink", n_k))


@register_piece("fa4", "multi_diagonal")
def _multi_diagonal_terms(params, n_q, n_k) -> HeadTerms:
    count = int(params.get("count", 0))
    # count 0 keeps every diagonal: no diagonal index reaches n_q + n_k.
    return HeadTerms(period=_size(params, "period", n_k), band=_size(params, "width", n_k),
                     last_diagonal=count - 1 if count > 0 else n_q + n_k)


@register_piece("fa4", "vertical_stripe")
def _vertical_stripe_terms(params, n_q, n_k) -> HeadTerms:
    return HeadTerms(window=_size(params, "window", n_k),
                     columns=tuple(sorted({int(c) for c in params["columns"] if c < n_k})))


@register_piece("fa4", "block_topk")
def _block_topk_terms(params, n_q, n_k) -> HeadTerms:
    block = int(params["block"])
    # The calibration layout stretched to this length; the per-row diagonal block is the
    # mask_mod's own term (_block_diagonal).
    return HeadTerms(layout=(block, get_pattern("block_topk")._stretched(params, n_q, n_k)))


def family_terms(kind: str) -> "Callable[[dict, int, int], HeadTerms] | None":
    """Family ``kind``'s FA4 piece (its mask as :class:`HeadTerms` at ``(params, n_q, n_k)``),
    registered above through the pattern registry; None for families FA4 does not serve
    (dynamic ones, ``vertical_slash``, stay on the Triton kernels)."""
    return backend_piece("fa4", kind)


# -- the mask arithmetic (torch tensors and CuTe TensorSSA alike) -----------------------------

def _near_diagonal(a, period, band, last, const):
    """``a >= 0`` within ``band`` of its nearest kept diagonal ``m * period``, ``m <= last``
    (the nearest diagonal rounded half up, clamped to the last kept one)."""
    nearest = (const(2) * a + period) // (const(2) * period)
    inner = (nearest <= last) & (a - nearest * period < band) & (nearest * period - a < band)
    return inner | ((nearest > last) & (a - last * period < band))


def keep_terms(q, k, offset, window, sink, period, band, last, causal: bool, const):
    """Whether query ``q`` keeps key ``k`` under a head's arithmetic terms (see
    :class:`HeadTerms`); ``offset = n_k - n_q``; ``const`` lifts a Python int to the values'
    kind. Stripe and layout lookups are or-ed in by the caller."""
    d = q + offset - k
    zero = const(0)
    kept = ((d < window) & (zero - d < window)) | (k < sink)
    # |d| without abs (CuTe values have none): each sign of d separately.
    kept = kept | ((d >= zero) & _near_diagonal(d, period, band, last, const))
    kept = kept | ((d < zero) & _near_diagonal(zero - d, period, band, last, const))
    return kept & (d >= zero) if causal else kept


def _block_diagonal(q, k, offset, block):
    """Key ``k`` lies in the block that holds query ``q``'s diagonal position."""
    return k // block == (q + offset) // block


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

    @property
    def has_stripes(self) -> bool:
        return bool(self.table[:, HAS_STRIPES].any())

    @property
    def has_layout(self) -> bool:
        return bool(self.table[:, HAS_LAYOUT].any())


def head_terms(group: HeadGroup, n_q: int, n_k: int) -> HeadTerms:
    """The terms of a group's heads at ``(n_q, n_k)``."""
    return family_terms(group.pattern)(group.params, n_q, n_k)


def build_tables(groups: list[HeadGroup], num_heads: int, n_q: int, n_k: int, causal: bool, block_n: int,
                 device: torch.device) -> SiteTables:
    """Per-head aux table and block-sparse tensors of the heads in ``groups`` (every group
    must have FA4 terms); heads in no group keep nothing here. When one group covers every
    head, the block tensors have one head row (broadcast), which keeps GQA packing on."""
    table = torch.zeros(num_heads, TABLE_COLUMNS, dtype=torch.int32)
    table[:, PERIOD] = 1
    table[:, BLOCK] = 1
    table[:, OFFSET] = n_k - n_q
    stripe_rows, layout_rows = [], []
    for group in groups:
        terms = head_terms(group, n_q, n_k)
        heads = torch.tensor(group.heads, dtype=torch.long)
        for column, value in ((WINDOW, terms.window), (SINK, terms.sink), (PERIOD, terms.period),
                              (BAND, terms.band), (LAST_DIAGONAL, terms.last_diagonal)):
            table[heads, column] = value
        if terms.columns:
            row = torch.zeros(n_k, dtype=torch.int32)
            row[list(terms.columns)] = 1
            table[heads, STRIPE_ROW], table[heads, HAS_STRIPES] = len(stripe_rows), 1
            stripe_rows.append(row)
        if terms.layout is not None:
            block, layout = terms.layout
            table[heads, BLOCK], table[heads, LAYOUT_ROW], table[heads, HAS_LAYOUT] = block, len(layout_rows), 1
            layout_rows.append(layout)
    # Unused lookups get a 1 x 2 placeholder: FA4 needs one unique stride-1 dim per aux tensor.
    columns = torch.stack(stripe_rows) if stripe_rows else torch.zeros(1, 2, dtype=torch.int32)
    layouts = _stack_padded(layout_rows)

    shared = len(groups) == 1 and sorted(groups[0].heads) == list(range(num_heads))
    n_qb, n_kb = math.ceil(n_q / BLOCK_M), math.ceil(n_k / block_n)
    any_kept = torch.zeros(1 if shared else num_heads, n_qb, n_kb, dtype=torch.bool, device=device)
    all_kept = torch.zeros_like(any_kept)
    for group in groups:
        some, every = get_pattern(group.pattern).block_classes(group.params, n_q, n_k, causal, BLOCK_M, block_n, device)
        rows = [0] if shared else group.heads
        any_kept[rows], all_kept[rows] = some, every
    partial_count, partial_index = _compact(any_kept & ~all_kept)
    full_count, full_index = _compact(all_kept)
    return SiteTables(table.to(device), columns.to(device), layouts.to(device), partial_count, partial_index,
                      full_count, full_index, block_n)


def _stack_padded(layouts: list[torch.Tensor]) -> torch.Tensor:
    if not layouts:
        return torch.zeros(1, 1, 2, dtype=torch.int32)
    rows = max(t.shape[0] for t in layouts)
    cols = max(t.shape[1] for t in layouts)
    stacked = torch.zeros(len(layouts), rows, cols, dtype=torch.int32)
    for i, layout in enumerate(layouts):
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
    row = tables.table[head].cpu().tolist()
    kept = keep_terms(q, k, row[OFFSET], row[WINDOW], row[SINK], row[PERIOD], row[BAND], row[LAST_DIAGONAL],
                      False, const=lambda x: x)
    if row[HAS_STRIPES]:
        kept = kept | (tables.columns[row[STRIPE_ROW]].cpu()[k] > 0)
    if row[HAS_LAYOUT]:
        layout = tables.layouts[row[LAYOUT_ROW]].cpu()
        block = row[BLOCK]
        kept = kept | (layout[q // block, k // block] > 0) | _block_diagonal(q, k, row[OFFSET], block)
    return kept & (q + row[OFFSET] - k >= 0) if causal else kept


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


# Off: every group runs sparsec's Triton kernels (the benchmark's per-backend columns).
ENABLED = True


def available(device: torch.device) -> bool:
    """FA4 serves this device: enabled, CUDA, compute capability 9.0 or newer, FA4 importable."""
    return (ENABLED and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and _interface() is not None)


def key_block(head_dim: int, device: torch.device) -> int:
    """The sparse key block FA4 accepts at ``head_dim``: its sm90 tile_n without mask or window
    (128, but 80 at head dim 256), 128 on newer chips (they split a block into tiles)."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return 128
    config = _interface()["interface"]._tile_size_fwd_sm90(head_dim, head_dim, False, False,
                                                           sparse_block_size_q=BLOCK_M)
    return config.n_block_size


@lru_cache(maxsize=8)
def _mask_mod(causal: bool, has_stripes: bool, has_layout: bool):
    """The CuTe mask_mod over the aux tensors ``(table, columns, layouts)``."""
    fa4 = _interface()
    cutlass, cute, utils = fa4["cutlass"], fa4["cute"], fa4["utils"]

    def const(value):
        return utils.scalar_to_ssa(value, cutlass.Int32)

    @cute.jit
    def sparsec_static_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        table = aux_tensors[0]
        h = head[0]
        offset = const(table[h, OFFSET])
        kept = keep_terms(q_idx, kv_idx, offset, const(table[h, WINDOW]), const(table[h, SINK]),
                          const(table[h, PERIOD]), const(table[h, BAND]), const(table[h, LAST_DIAGONAL]),
                          causal, const)
        if cutlass.const_expr(has_stripes):
            stripe = const(aux_tensors[1][table[h, STRIPE_ROW], kv_idx[0]])
            kept = kept | ((const(table[h, HAS_STRIPES]) > const(0)) & (stripe > const(0)))
        if cutlass.const_expr(has_layout):
            block = const(table[h, BLOCK])
            cell = const(aux_tensors[2][table[h, LAYOUT_ROW], q_idx[0] // table[h, BLOCK],
                                        kv_idx[0] // table[h, BLOCK]])
            hit = (cell > const(0)) | _block_diagonal(q_idx, kv_idx, offset, block)
            kept = kept | ((const(table[h, HAS_LAYOUT]) > const(0)) & hit)
        return kept

    return sparsec_static_mask


def _plain_window(groups: list[HeadGroup], num_heads: int) -> bool:
    """The site's one group is a plain window over every head (FA4's native window)."""
    return len(groups) == 1 and groups[0].pattern == "window" and sorted(groups[0].heads) == list(range(num_heads))


def site_call(q, k, v, scale: float, causal: bool, groups: list[HeadGroup]) -> Callable[..., None]:
    """``launch(q, k, v, out)``: one FA4 call for ``groups`` of this input signature, writing
    their heads of the contiguous ``[B, H, n_q, D]`` ``out`` (and zeros in the other heads)."""
    fa4 = _interface()
    interface = fa4["interface"]
    num_heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
    if _plain_window(groups, num_heads):
        width = Elastic.from_json(groups[0].params["window"]).at(n_k)
        window = (width - 1, 0 if causal else width - 1)

        def launch_window(q, k, v, out) -> None:
            interface._flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                      causal=causal, window_size_left=window[0], window_size_right=window[1],
                                      out=out.transpose(1, 2))
        return launch_window

    tables = build_tables(groups, num_heads, n_q, n_k, causal, key_block(q.shape[-1], q.device), q.device)
    sparse = fa4["BlockSparseTensorsTorch"](
        mask_block_cnt=tables.partial_count, mask_block_idx=tables.partial_index,
        full_block_cnt=tables.full_count, full_block_idx=tables.full_index, block_size=(BLOCK_M, tables.block_n))
    mask_mod = _mask_mod(causal, tables.has_stripes, tables.has_layout)
    aux = [tables.table, tables.columns, tables.layouts]

    def launch(q, k, v, out) -> None:
        interface._flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                  causal=False, mask_mod=mask_mod, block_sparse_tensors=sparse, aux_tensors=aux,
                                  out=out.transpose(1, 2))
    return launch


def serves(q, k, v, mask, group: HeadGroup) -> bool:
    """Whether the FA4 backend takes ``group`` for these inputs."""
    from sparsec.cost_model import attention_backend
    return (mask is None and family_terms(group.pattern) is not None and q.dtype in FA4_DTYPES
            and q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and attention_backend(_arch(q.device), group.pattern, q.shape[-1]) == "fa4")


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
    mine = [g for g in groups if serves(q, k, v, mask, g)]
    if not mine:
        return [], groups
    rest = [g for g in groups if g not in mine]
    try:
        call = site_call(q, k, v, scale, causal, mine)
        probe = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        call(q, k, v, probe)        # compiles, and proves FA4 takes the shape before it is relied on
    except (ValueError, AssertionError, NotImplementedError, RuntimeError, TypeError) as error:
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"sparsec: FlashAttention-4 refused a site at head dim {q.shape[-1]} ({reason}); "
                          "its groups run the Triton kernels", stacklevel=3)
        return [], groups
    return [lambda q, k, v, out, mask: call(q, k, v, out)], rest
