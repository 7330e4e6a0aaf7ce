"""Recognise key/value tensors whose heads were repeated to match the query heads (GQA),
so the canonical attention can take the ``Hkv``-head tensors instead.

Forms (``x`` is ``[B, Hkv, N, D]``, ``r`` the repeat factor):

- Hugging Face ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, r, N, D).reshape(B, Hkv*r, N, D)``
- ``x.repeat_interleave(r, dim=1)`` (what SDPA's ``enable_gqa`` does)
- ``x.expand(B, H, N, D)`` from one head (multi-query attention)
- ``x.repeat(1, r, 1, 1)`` and ``x[:, None].expand(B, r, Hkv, N, D).reshape(...)``: these
  *tile* the heads, so query head ``h`` reads kv head ``h % Hkv`` and not ``h // r``.

sparsec's attention reads kv head ``h // (Hq // Hkv)``, so only the grouped forms (or any
form with ``Hkv == 1``) may be stripped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from sparsec.passes.helpers.graph_utils import arguments, is_call, same_shape, same_size, skip_identity, value

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclass
class HeadRepeat:
    """``repeated`` holds the heads of ``base`` (``[B, Hkv, N, D]``) each ``factor`` times."""

    base: Node
    factor: int
    grouped: bool   # query head h reads base head h // factor (else h % Hkv)
    form: str


def _repeat(base: Node, factor, grouped: bool, form: str) -> HeadRepeat | None:
    if not isinstance(factor, int) or factor < 1:
        return None      # a symbolic repeat count cannot be checked against the heads
    return HeadRepeat(base, factor, grouped or value(base).shape[1] == 1, form)


def _heads_only_differ(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    """Same rank, equal sizes except along ``dim``."""
    return a.dim() == b.dim() and same_shape(a.shape[:dim] + a.shape[dim + 1:], b.shape[:dim] + b.shape[dim + 1:])


def _from_repeat_interleave(node: Node) -> HeadRepeat | None:
    args = arguments(node)
    x = skip_identity(args["input"])
    if value(x).dim() != 4 or args["dim"] is None or args["dim"] % 4 != 1:
        return None
    return _repeat(x, args["repeats"], grouped=True, form="repeat_interleave")


def _from_repeat(node: Node) -> HeadRepeat | None:
    x = skip_identity(node.args[0])
    repeats = list(node.args[1])
    if value(x).dim() != 4 or len(repeats) != 4 or repeats[0] != 1 or repeats[2:] != [1, 1]:
        return None
    return _repeat(x, repeats[1], grouped=False, form="repeat")


def _from_expand(node: Node) -> HeadRepeat | None:
    """``[B, 1, N, D] -> [B, H, N, D]``: one kv head shared by all query heads."""
    x = skip_identity(node.args[0])
    source, result = value(x), value(node)
    if source.dim() != 4 or source.shape[1] != 1 or not _heads_only_differ(source, result, 1):
        return None
    return _repeat(x, result.shape[1], grouped=True, form="expand")


def _from_expand_reshape(node: Node) -> HeadRepeat | None:
    """reshape(expand(unsqueeze(x, d))): d = 2 groups the copies, d = 1 tiles them."""
    expanded = skip_identity(node.args[0])
    if not is_call(expanded, aten.expand.default):
        return None
    unsqueezed = skip_identity(expanded.args[0])
    if not is_call(unsqueezed, aten.unsqueeze.default):
        return None
    x = skip_identity(unsqueezed.args[0])
    source, result = value(x), value(node)
    if source.dim() != 4 or result.dim() != 4:
        return None
    dim = unsqueezed.args[1] % 5
    copies = value(expanded).shape[dim]
    if dim not in (1, 2) or not _heads_only_differ(value(unsqueezed), value(expanded), dim):
        return None
    if not (_heads_only_differ(source, result, 1) and same_size(result.shape[1], source.shape[1] * copies)):
        return None
    return _repeat(x, copies, grouped=dim == 2, form="repeat_kv" if dim == 2 else "tile")


def find_head_repeat(node: Node) -> HeadRepeat | None:
    """The head repeat that produced ``node`` (a ``[B, H, N, D]`` key or value), if any."""
    node = skip_identity(node)
    if value(node) is None or value(node).dim() != 4:
        return None
    if is_call(node, aten.repeat_interleave.self_int):
        return _from_repeat_interleave(node)
    if is_call(node, aten.repeat.default):
        return _from_repeat(node)
    if is_call(node, aten.expand.default):
        return _from_expand(node)
    if is_call(node, *_RESHAPES):
        return _from_expand_reshape(node)
    return None
