"""Compressed storage of a sparse weight: the kept values plus a packed bit mask.

``values`` holds the kept entries in row-major order; ``mask`` is one bit per *unit*,
little-endian within each ``uint8``. A unit is one entry for unstructured and N:M
weights (for 2:4 that is 4 bits a group, the size of the hardware metadata), and one
``B x B`` tile for block weights, whose values are then the tiles in row-major tile
order, each row-major: exactly the values of block-CSR (``[nnz_blocks, B, B]``), whose
row offsets and column indices follow from the mask (:func:`block_csr`).

A bf16 weight at 50% takes 1 + 1/8 bytes per entry instead of 2 (56%); a block64 weight
at 50%, half of dense plus 1 bit per tile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from sparsec.weights.structures import Structure, parse_structure

_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


@dataclass(frozen=True)
class Layout:
    """What a ``sparse_linear`` node needs to know about its compressed weight."""

    structure: str
    out_features: int
    in_features: int

    def encode(self) -> str:
        return json.dumps({"structure": self.structure, "out_features": self.out_features,
                           "in_features": self.in_features}, sort_keys=True)

    @property
    def block(self) -> int:
        """The tile side of a block structure; 1 for entry-wise structures."""
        parsed = parse_structure(self.structure)
        return parsed.block if parsed.kind == "block" else 1

    def units(self) -> tuple[int, int]:
        """Rows and columns of the mask grid (tiles for block structures)."""
        return self.out_features // self.block, self.in_features // self.block


@lru_cache(maxsize=4096)
def decode_layout(text: str) -> Layout:
    return Layout(**json.loads(text))


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> ``uint8[ceil(n / 8)]``, bit ``i % 8`` of byte ``i // 8`` is element ``i``."""
    flat = keep.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-len(flat)) % 8)])
    return (flat.reshape(-1, 8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, count: int) -> torch.Tensor:
    bits = (mask[:, None] & _BITS.to(mask.device)) != 0
    return bits.reshape(-1)[:count]


def unit_mask(keep: torch.Tensor, structure: "str | Structure") -> torch.Tensor:
    """Element keep-mask -> per-unit mask (tiles for block structures; must be whole)."""
    parsed = parse_structure(structure)
    if parsed.kind != "block":
        return keep
    b = parsed.block
    tiles = keep.reshape(keep.shape[0] // b, b, keep.shape[1] // b, b).permute(0, 2, 1, 3)
    whole = tiles.all(dim=(2, 3))
    if not torch.equal(whole, tiles.any(dim=(2, 3))):
        raise ValueError(f"a {structure} mask must keep or prune whole {b}x{b} tiles")
    return whole


def compress(weight: torch.Tensor, keep: torch.Tensor, structure: "str | Structure") -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """``(values, mask, layout)`` of ``weight`` restricted to ``keep``."""
    parsed = parse_structure(structure)
    out_features, in_features = weight.shape
    layout = Layout(str(parsed), out_features, in_features)
    units = unit_mask(keep, parsed)
    if parsed.kind == "block":
        b = parsed.block
        tiles = weight.reshape(out_features // b, b, in_features // b, b).permute(0, 2, 1, 3)
        values = tiles[units].reshape(-1)
    else:
        values = weight[units]
    return values.contiguous(), pack_bits(units), layout


def decompress(values: torch.Tensor, mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The dense ``[out_features, in_features]`` weight, zeros where pruned."""
    rows, cols = layout.units()
    units = unpack_bits(mask, rows * cols).reshape(rows, cols)
    b = layout.block
    if b == 1:
        weight = values.new_zeros(rows, cols)
        weight[units] = values
        return weight
    tiles = values.new_zeros(rows, cols, b, b)
    tiles[units] = values.reshape(-1, b, b)
    return tiles.permute(0, 2, 1, 3).reshape(layout.out_features, layout.in_features)


def block_csr(mask: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-CSR ``(crow_indices, col_indices)`` (int32) of a block layout's tile mask."""
    rows, cols = layout.units()
    units = unpack_bits(mask, rows * cols).reshape(rows, cols)
    crow = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
    crow[1:] = units.sum(dim=1).cumsum(0)
    col = units.nonzero()[:, 1].to(torch.int32)
    return crow, col


def storage_bytes(values: torch.Tensor, mask: torch.Tensor) -> int:
    return values.numel() * values.element_size() + mask.numel()
