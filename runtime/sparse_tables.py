"""Host-side arguments and tables of the generated attention kernels, built with torch on the
kernel's device.

- :func:`index_arguments`: the sizes of an index-arithmetic family at a length (elastic
  sizes resolved at ``N = n_k``), and the stripe column list and bitmap; the template's
  arguments are named as the families' parameters (``sink``, ``window``, ``period``,
  ``width``, ``count``, ``columns``);
- :func:`grid_tables`: a static family's lookup table per length, with its kept-cell grid
  (``Pattern.keep_grid``), built once and cached;
- :func:`vertical_slash_tables`: per input, the block table and column lists of the
  estimated columns and diagonals (the index build of MInference's vertical-slash kernel);
- :func:`dynamic_blocks_tables`: per input, the block table of an estimated block layout.

A dynamic family's builder is its ``"triton_tables"`` piece (``register_piece``), called
with its estimate, the lengths, ``causal`` and the kernel's tile.

Tables list key blocks per query block, *full* blocks (every pair of the tile kept, every
key in range) before *partial* ones, with ``counts[..., :] = (n_full, n_blocks, n_columns)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from sparsec.ir.shape_cache import shape_cache
from sparsec.patterns import Elastic, get_pattern, register_piece

@dataclass
class IndexArguments:
    sink: int
    window: int
    period: int
    width: int
    count: int
    bias: int                  # a multiple of period that makes every divided number non-negative
    n_columns: int
    columns: torch.Tensor      # int32 stripe columns < n_k, sorted (at least one element)
    colmap: torch.Tensor       # int8 [n_k], 1 at stripe columns

    def scalars(self) -> tuple[int, ...]:
        return (self.sink, self.window, self.period, self.width, self.count, self.bias, self.n_columns)


@lru_cache(maxsize=256)
def index_arguments(params_json: str, n_q: int, n_k: int, device: torch.device) -> IndexArguments:
    """Runtime arguments of the index-arithmetic template for one pattern at one length."""
    params = json.loads(params_json)

    def size(name: str, default=1) -> int:
        return Elastic.from_json(params[name]).at(n_k) if name in params else default

    period = size("period", 1)
    width = size("width", 1)
    columns = sorted({int(c) for c in params.get("columns", []) if 0 <= int(c) < n_k})
    column_tensor = torch.tensor(columns or [0], dtype=torch.int32, device=device)
    colmap = torch.zeros(max(n_k, 1), dtype=torch.int8, device=device)
    colmap[torch.tensor(columns, dtype=torch.long, device=device)] = 1
    bias = period * math.ceil((2 * (n_q + n_k) + width + 1024) / period)
    return IndexArguments(sink=size("sink", 0), window=size("window", 1), period=period, width=width,
                          count=int(params.get("count", 0)), bias=bias, n_columns=len(columns),
                          columns=column_tensor, colmap=colmap)


def _compact(values: torch.Tensor, first: torch.Tensor, second: torch.Tensor):
    """Along the last dim, ``values`` where ``first``, then where ``second``, order kept.

    Returns the int32 table (same width, tail unspecified), the count of ``first`` and the
    total count. Scatter by prefix sums: linear work, no sort, no host sync.
    """
    width = first.shape[-1]
    second = second & ~first
    n_first = first.sum(-1, dtype=torch.int32)
    position = torch.where(first, first.cumsum(-1) - 1, n_first[..., None] + second.cumsum(-1) - 1)
    position = torch.where(first | second, position, width)           # the rest goes to a spill slot
    table = torch.zeros(*first.shape[:-1], width + 1, dtype=torch.int32, device=first.device)
    table.scatter_(-1, position, values.to(torch.int32).expand(first.shape))
    return table[..., :width], n_first, n_first + second.sum(-1, dtype=torch.int32)


@dataclass
class LutTables:
    lut: torch.Tensor          # int32 [..., n_query_blocks, n_key_blocks]
    counts: torch.Tensor       # int32 [..., n_query_blocks, 3]
    columns: torch.Tensor      # int32 [..., n_query_blocks, n_columns] (or a 1-element dummy)
    layout: torch.Tensor       # int8 kept-cell grid ([..., grid_q, grid_k]) or a 1-element dummy
    colmap: torch.Tensor       # int8 [..., n_k] (vertical_slash) or a 1-element dummy
    offmap: torch.Tensor       # int8 [..., 2 n_k - 1] (vertical_slash) or a 1-element dummy
    layout_shape: tuple = (1, 1, 1, 1, 1)   # block, grid_q, grid_k, blocks_q, blocks_k


@lru_cache(maxsize=64)
def grid_tables(pattern: str, params_json: str, n_q: int, n_k: int, causal: bool, block_m: int, block_n: int,
                device: torch.device) -> LutTables:
    """The lookup table of a static family at one length, shared by every head: its blocks
    classified full / partial (``Pattern.block_classes``) and its kept-cell grid
    (``Pattern.keep_grid``) for the partial blocks' mask."""
    family, params = get_pattern(pattern), json.loads(params_json)
    any_kept, all_kept = family.block_classes(params, n_q, n_k, causal, block_m, block_n, device)
    key_blocks = torch.arange(any_kept.shape[-1], device=device)
    lut, n_full, n_blocks = _compact(key_blocks, all_kept, any_kept)
    counts = torch.stack([n_full, n_blocks, torch.zeros_like(n_full)], dim=-1).contiguous()
    grid, block = family.keep_grid(params, n_q, n_k)
    dummy, grid = _placeholder(device, torch.int8), grid.to(device=device, dtype=torch.int8).contiguous()
    return LutTables(lut, counts, _placeholder(device, torch.int32), grid, dummy, dummy,
                     (block, *grid.shape, math.ceil(n_q / block), math.ceil(n_k / block)))


@register_piece("triton_tables", "vertical_slash")
def vertical_slash_tables(columns: torch.Tensor, diagonals: torch.Tensor, n_q: int, n_k: int, causal: bool,
                          block_m: int, block_n: int) -> LutTables:
    """Per input (a dynamic family's estimate): key-block tables of the estimated diagonals
    and the column lists.

    ``columns`` ``[B, G, V]`` and ``diagonals`` ``[B, G, S]`` come from
    ``VerticalSlash.estimate_indices``. A key block is listed for a query block when one
    of the diagonals crosses the tile (its offset range ``[p0 - c1, p1 - c0]`` holds a kept
    offset, counted with a prefix sum over the offset map); it is full when every offset
    of that range is kept. A column is gathered when its block is not listed (and, causal,
    it is not after the block's last query position).
    """
    device = columns.device
    batch, heads = columns.shape[:2]
    shift = n_k - 1
    offmap = torch.zeros(batch, heads, 2 * n_k - 1, dtype=torch.int8, device=device)
    offmap.scatter_(-1, diagonals + shift, 1)
    if causal:
        offmap[..., :shift] = 0
    colmap = torch.zeros(batch, heads, n_k, dtype=torch.int8, device=device)
    colmap.scatter_(-1, columns, 1)
    prefix = torch.zeros(batch, heads, 2 * n_k, dtype=torch.int32, device=device)
    prefix[..., 1:] = offmap.cumsum(-1)

    tiling = _slash_tiling(n_q, n_k, causal, block_m, block_n, device)
    index_hi, index_lo = (index.reshape(1, 1, -1).expand(batch, heads, -1) for index in tiling.prefix_index)
    kept = (prefix.gather(-1, index_hi) - prefix.gather(-1, index_lo)).view(batch, heads, *tiling.offsets.shape)
    any_kept = (kept > 0) & tiling.in_range
    all_kept = (kept == tiling.offsets) & tiling.fillable
    lut, n_full, n_blocks = _compact(tiling.key_tiles, all_kept, any_kept)

    n_qb = tiling.offsets.shape[0]
    listed = any_kept.gather(-1, (columns // block_n)[:, :, None, :].expand(-1, -1, n_qb, -1))
    gather = ~listed
    if causal:
        gather &= columns[:, :, None, :] <= tiling.p_last[None, None, :, None]
    column_table, _, n_columns = _compact(columns[:, :, None, :], gather, torch.zeros_like(gather))
    counts = torch.stack([n_full, n_blocks, n_columns], dim=-1)
    return LutTables(lut, counts, column_table, _placeholder(device, torch.int8), colmap, offmap)


@dataclass(frozen=True)
class _SlashTiling:
    """What ``vertical_slash``'s tables need of the shape alone, made once per shape (see
    :class:`_LayoutTiling`)."""
    prefix_index: tuple         # (hi + 1, lo) of each tile's offset range, as positions of the prefix sums
    offsets: torch.Tensor       # [n_qb, n_kb]: how many offsets a tile spans
    in_range: torch.Tensor      # its offset range meets [-(n_k - 1), n_k - 1]
    fillable: torch.Tensor      # its keys are all in range
    p_last: torch.Tensor        # [n_qb]: each query block's last key position
    key_tiles: torch.Tensor     # arange(n_kb)


@shape_cache(maxsize=64)
def _slash_tiling(n_q: int, n_k: int, causal: bool, block_m: int, block_n: int, device: torch.device) -> _SlashTiling:
    shift = n_k - 1
    n_qb, n_kb = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    query_start = torch.arange(n_qb, device=device) * block_m
    p_first = query_start + (n_k - n_q)
    p_last = torch.clamp(query_start + block_m, max=n_q) - 1 + (n_k - n_q)
    key_start = torch.arange(n_kb, device=device) * block_n
    key_last = torch.clamp(key_start + block_n, max=n_k) - 1
    lo = p_first[:, None] - key_last[None, :]              # offsets d = p - j a tile spans
    hi = p_last[:, None] - key_start[None, :]
    prefix_index = ((hi.clamp(-shift, shift) + shift + 1).flatten(), (lo.clamp(-shift, shift) + shift).flatten())
    return _SlashTiling(prefix_index, hi - lo + 1, (hi >= -shift) & (lo <= shift),
                        (key_start + block_n <= n_k)[None, :].expand(n_qb, -1), p_last,
                        torch.arange(n_kb, device=device))


@register_piece("triton_tables", "dynamic_blocks")
def dynamic_blocks_tables(layout: torch.Tensor, block: int, n_q: int, n_k: int, causal: bool,
                          block_m: int, block_n: int) -> LutTables:
    """Per input: the key-block tables of an estimated ``dynamic_blocks`` layout (``[B, G,
    ceil(n_q/block), ceil(n_k/block)]``, from ``DynamicBlocks.estimate_indices``), which is also
    the partial tiles' kept-cell grid. A tile is listed when a kept cell overlaps it (and,
    causal, it starts at or before its last row's position); it is full when every cell it
    overlaps is kept, every key is in range and, causal, it ends at or before its first row's
    position."""
    tiling = _layout_tiling(block, n_q, n_k, causal, block_m, block_n, layout.device)
    fine = layout.index_select(-2, tiling.fine_q).index_select(-1, tiling.fine_k)
    shape = (*layout.shape[:2], *tiling.tiles)
    any_kept = torch.nn.functional.pad(fine, tiling.pad, value=False).view(shape).any(5).any(3) & tiling.listable
    rows_past_end = torch.nn.functional.pad(fine, (0, 0, 0, tiling.pad[3]), value=True)   # never spoil a full tile
    all_kept = torch.nn.functional.pad(rows_past_end, tiling.pad[:2], value=False).view(shape).all(5).all(3)
    lut, n_full, n_blocks = _compact(tiling.key_tiles, all_kept & tiling.fillable, any_kept)
    counts = torch.stack([n_full, n_blocks, torch.zeros_like(n_full)], dim=-1)
    blocks_q, blocks_k = layout.shape[-2:]
    dummy = _placeholder(layout.device, torch.int8)
    return LutTables(lut, counts, _placeholder(layout.device, torch.int32), layout.to(torch.int8).contiguous(),
                     dummy, dummy,
                     (block, blocks_q, blocks_k, blocks_q, blocks_k))


@dataclass(frozen=True)
class _LayoutTiling:
    """What a layout's tables need of its shape alone (made once per shape: a dynamic group
    builds its tables every call, and host time is most of it, ~10-20 us an op on the H200's
    host)."""
    fine_q: torch.Tensor        # the layout row of each ``step`` rows
    fine_k: torch.Tensor        # the layout column of each ``step`` keys
    pad: tuple                  # padding of the fine grid to whole kernel tiles
    tiles: tuple                # (n_qt, block_m / step, n_kt, block_n / step)
    listable: torch.Tensor      # [n_qt, n_kt]: tiles the causal cut leaves any pair of
    fillable: torch.Tensor      # [n_qt, n_kt]: tiles that may be full (keys in range, before the cut)
    key_tiles: torch.Tensor     # arange(n_kt)


@shape_cache(maxsize=64)
def _layout_tiling(block: int, n_q: int, n_k: int, causal: bool, block_m: int, block_n: int,
                   device: torch.device) -> _LayoutTiling:
    step = math.gcd(block, block_m, block_n)              # a grid that tiles cells and kernel tiles
    n_qt, n_kt = math.ceil(n_q / block_m), math.ceil(n_k / block_n)
    fine_q = torch.arange(math.ceil(n_q / step), device=device) * step // block
    fine_k = torch.arange(math.ceil(n_k / step), device=device) * step // block
    pad = (0, n_kt * block_n // step - len(fine_k), 0, n_qt * block_m // step - len(fine_q))
    key_start = torch.arange(n_kt, device=device) * block_n
    listable = torch.ones(n_qt, n_kt, dtype=torch.bool, device=device)
    fillable = (key_start + block_n <= n_k)[None, :].expand(n_qt, -1)
    if causal:
        query_start = torch.arange(n_qt, device=device) * block_m
        p_first = query_start + (n_k - n_q)
        p_last = torch.clamp(query_start + block_m, max=n_q) - 1 + (n_k - n_q)
        listable = key_start[None, :] <= p_last[:, None]
        fillable = fillable & (key_start[None, :] + block_n - 1 <= p_first[:, None])
    return _LayoutTiling(fine_q, fine_k, pad, (n_qt, block_m // step, n_kt, block_n // step), listable,
                         fillable, torch.arange(n_kt, device=device))


@shape_cache(maxsize=16)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The one-element table a kernel argument takes where its family has none (read-only)."""
    return torch.zeros(1, dtype=dtype, device=device)
