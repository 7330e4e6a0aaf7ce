"""Which parameters to permute so that an attention site's heads come out in a new order.

Walks the fx graph from a ``sparsec.attention`` node back to the parameters that produce
q, k and v, and forward to the parameter that consumes its output (the output
projection's input columns), tracking where each head's data lies (:class:`HeadLayout`).
The walk passes view/reshape/transpose/permute/expand, select/split/slice, casts, and
element-wise ops. RoPE is such a chain: ``q * cos + rotate_half(q) * sin`` multiplies by
tables broadcast over the head axis and slices/concatenates along the head dimension, so it
acts within a head and commutes with any head permutation; the walk checks exactly that
(an operand is head-invariant when its size along the head axis is 1). Anything else —
an unknown op, a tensor that is used outside the chain, a parameter shared with other
nodes (tied weights) — stops the walk with the reason, and the caller falls back.

The permutation itself is MoA's offline trick (Fu et al. 2024): permuting the rows of the
q/k/v projections and the input columns of the output projection reorders heads at no
run-time cost.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import sympy
import torch
from torch.fx import Node

from sparsec.passes.helpers.graph_utils import op_name, real_users, value

aten = torch.ops.aten


class NotPermutable(Exception):
    """The walk met something it cannot see through; the message says what."""


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of a tensor lie: head ``h`` is the index range
    ``[offset + h*stride, offset + h*stride + width)`` along dimension ``axis``, at index
    ``i`` along each ``(dim, i)`` of ``fixed``; other dimensions are free (batch, tokens,
    or features within the head). ``[B, H, N, D]`` has ``axis=1``; the projection output
    ``[B, N, H*D]`` has ``axis=2, stride=width=D``."""

    heads: int
    axis: int
    offset: int = 0
    stride: int = 1
    width: int = 1
    fixed: tuple = ()

    def dims(self) -> set[int]:
        return {self.axis} | {d for d, _ in self.fixed}


@dataclass(frozen=True)
class ParameterMove:
    """Permute the head ranges of parameter ``target`` along ``layout.axis`` by the
    permutation of ``role`` (``"q"`` query heads, ``"kv"`` key/value heads)."""

    target: str
    layout: HeadLayout
    role: str


@dataclass
class HeadMoves:
    """Everything that must move for one site: parameter moves, and whether the mask is per head."""

    moves: list[ParameterMove]
    mask_per_head: bool


def _rank(node: Node) -> int:
    return value(node).dim()


def _norm(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


# -- layouts through reshapes -------------------------------------------------------------

def _expr(size) -> sympy.Expr:
    return sympy.Integer(size) if isinstance(size, int) else sympy.sympify(size.node.expr)


def _reshape_chunks(src, dst) -> list[tuple[list[int], list[int]]]:
    """Pair the dimensions of a reshape's two shapes into runs with equal products."""
    chunks, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        a, b = [i], [j]
        pa, pb = _expr(src[i]), _expr(dst[j])
        i, j = i + 1, j + 1
        while sympy.expand(pa - pb) != 0:
            num, den = sympy.fraction(sympy.cancel(pb / pa))
            grow_src = den == 1 if not (pa.is_Integer and pb.is_Integer) else pa < pb
            grow_dst = num == 1 if not (pa.is_Integer and pb.is_Integer) else pb < pa
            if grow_src and i < len(src):
                a.append(i)
                pa, i = pa * _expr(src[i]), i + 1
            elif grow_dst and j < len(dst):
                b.append(j)
                pb, j = pb * _expr(dst[j]), j + 1
            else:
                raise NotPermutable(f"reshape {list(src)} -> {list(dst)} does not split into matching dimensions")
        chunks.append((a, b))
    for k in range(i, len(src)):                # trailing size-1 dimensions
        chunks[-1][0].append(k)
    for k in range(j, len(dst)):
        chunks[-1][1].append(k)
    return chunks


def _static(sizes) -> list[int]:
    if not all(isinstance(s, int) for s in sizes):
        raise NotPermutable(f"head dimensions have symbolic sizes {list(sizes)}")
    return list(sizes)


def _suffix_products(sizes: list[int]) -> list[int]:
    return [math.prod(sizes[k + 1:]) for k in range(len(sizes))]


def reshape_layout(layout: HeadLayout, src, dst) -> HeadLayout:
    """The layout of the same heads after reshaping a tensor of shape ``src`` to ``dst``."""
    fixed = dict(layout.fixed)
    placed, new_fixed = None, {}
    for a, b in _reshape_chunks(src, dst):
        if layout.axis not in a:
            pinned = [d for d in a if d in fixed]
            if pinned and (len(a) != 1 or len(b) != 1):
                raise NotPermutable(f"an index-selected dimension is reshaped ({list(src)} -> {list(dst)})")
            if pinned:
                new_fixed[b[0]] = fixed[a[0]]
            continue
        inner = _suffix_products(_static([src[d] for d in a]))
        k = a.index(layout.axis)
        if any(d in fixed for d in a[k + 1:]):
            raise NotPermutable("a dimension inside each head is index-selected before a reshape")
        if any(d not in fixed and src[d] != 1 for d in a[:k]):
            raise NotPermutable(f"heads are not contiguous in reshape {list(src)} -> {list(dst)}")
        start = sum(fixed.get(d, 0) * inner[n] for n, d in enumerate(a)) + layout.offset * inner[k]
        placed, outer = _split_range(layout.heads, start, layout.stride * inner[k], layout.width * inner[k],
                                     b, _static([dst[d] for d in b]))
        new_fixed.update(outer)
    if placed is None:
        raise NotPermutable("the head axis disappears in a reshape")
    axis, offset, stride, width = placed
    return replace(layout, axis=axis, offset=offset, stride=stride, width=width,
                   fixed=tuple(sorted(new_fixed.items())))


def _split_range(heads: int, start: int, step: int, length: int, dims: list[int], sizes: list[int]):
    """Express flat ranges ``[start + h*step, +length)`` of a row-major group of ``dims`` as
    a range along one of them, the outer ones fixed; the first dimension that fits wins."""
    inner = _suffix_products(sizes)
    last = start + (heads - 1) * step
    for m, (size, below) in enumerate(zip(sizes, inner)):
        if start % below or step % below or length % below:
            continue
        span = size * below
        if start // span != last // span or (last % span) // below + length // below > size:
            continue
        outer = start // span
        fixed = {}
        for n in range(m - 1, -1, -1):
            fixed[dims[n]] = outer % sizes[n]
            outer //= sizes[n]
        return (dims[m], (start % span) // below, step // below, length // below), fixed
    raise NotPermutable(f"head ranges (start {start}, step {step}, length {length}) straddle dimensions {sizes}")


# -- the walk ----------------------------------------------------------------------------------

_UNARY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
          aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.lift_fresh_copy.default,
          aten.dropout.default, aten.neg.default, aten.exp.default, aten.sqrt.default,
          aten.rsqrt.default, aten.sigmoid.default, aten.tanh.default, aten.silu.default,
          aten.relu.default, aten.gelu.default, aten.abs.default, aten.pow.Tensor_Scalar,
          aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar}
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
             aten.unflatten.int}
_PERMUTES = {aten.transpose.int, aten.permute.default, aten.t.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
# Ops that read only a tensor's metadata: permuting values leaves them unchanged.
_METADATA = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}


def _permutation_of(node: Node) -> list[int]:
    """``out.dim(k) == in.dim(perm[k])`` for transpose/permute/t."""
    rank = _rank(node)
    if node.target is aten.permute.default:
        return [_norm(d, rank) for d in node.args[1]]
    perm = list(range(rank))
    a, b = (0, 1) if node.target is aten.t.default else (_norm(node.args[1], rank), _norm(node.args[2], rank))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _move_dims(layout: HeadLayout, mapping) -> HeadLayout:
    fixed = tuple(sorted((mapping(d), i) for d, i in layout.fixed))
    return replace(layout, axis=mapping(layout.axis), fixed=fixed)


class _Walk:
    """Collects the parameter moves of one site and the nodes its chains touch."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.moves: list[ParameterMove] = []
        self.chain: set[Node] = set()        # nodes whose values carry the site's heads
        self.consumers: set[Node] = set()    # output projections (their results carry no heads)
        self._seen: set = set()

    # ---- backward: from an attention input to the parameters that produce it
    def back(self, node: Node, layout: HeadLayout, role: str) -> None:
        if (node, layout, role) in self._seen:
            return
        self._seen.add((node, layout, role))
        self.chain.add(node)
        if node.op == "get_attr":
            self.moves.append(ParameterMove(node.target, layout, role))
            return
        if node.op != "call_function":
            raise NotPermutable(f"{role} comes from {node.op} {node.name}, not from parameters in the graph")
        for source, source_layout in self._producers(node, layout):
            self.back(source, source_layout, role)

    def _producers(self, node: Node, layout: HeadLayout) -> list[tuple[Node, HeadLayout]]:
        target, args = node.target, node.args
        if target in _UNARY:
            return [(args[0], layout)]
        if target in _ELEMENTWISE:
            return [p for p in (self._operand(node, x, layout) for x in args) if p is not None]
        if target in _RESHAPES:
            return [(args[0], reshape_layout(layout, value(node).shape, value(args[0]).shape))]
        if target is aten.expand.default:
            return [(args[0], self._unexpand(node, layout))]
        if target in _PERMUTES:
            perm = _permutation_of(node)
            return [(args[0], _move_dims(layout, lambda d: perm[d]))]
        if target is aten.select.int:
            dim = _norm(args[1], _rank(args[0]))
            moved = _move_dims(layout, lambda d: d + (d >= dim))
            index = args[2] % value(args[0]).shape[dim]
            return [(args[0], replace(moved, fixed=tuple(sorted(moved.fixed + ((dim, index),)))))]
        if target is aten.slice.Tensor:
            return [(args[0], self._unslice(node, layout))]
        if target is operator.getitem and args[0].target in _SPLITS:
            return [self._unsplit(node, layout)]
        if target is aten.cat.default:
            dim = _norm(args[1] if len(args) > 1 else 0, _rank(node))
            if dim in layout.dims():
                raise NotPermutable(f"{node.name} concatenates along the head axis")
            return [(x, layout) for x in args[0]]
        if target in _REDUCTIONS:
            dims = {_norm(d, _rank(args[0])) for d in args[1]}
            if not (len(args) > 2 and args[2]) or dims & layout.dims():
                raise NotPermutable(f"{node.name} reduces across heads (or drops dimensions)")
            return [(args[0], layout)]
        if target in (aten.linear.default, aten.addmm.default, aten.mm.default):
            return self._projection_parameters(node, layout)
        raise NotPermutable(f"the walk does not pass {op_name(node)} ({node.name})")

    def _operand(self, node: Node, operand, layout: HeadLayout):
        """An element-wise operand: None when it is broadcast over the heads (commutes
        with a head permutation), else the operand with its layout."""
        tensor = value(operand)
        if tensor is None:
            return None
        lead = _rank(node) - tensor.dim()
        axis = layout.axis - lead
        if axis < 0 or tensor.shape[axis] == 1:
            return None
        fixed = tuple((d - lead, i) for d, i in layout.fixed if d >= lead and tensor.shape[d - lead] != 1)
        return operand, replace(layout, axis=axis, fixed=fixed)

    def _unexpand(self, node: Node, layout: HeadLayout) -> HeadLayout:
        source = value(node.args[0])
        lead = _rank(node) - source.dim()
        axis = layout.axis - lead
        if axis < 0 or source.shape[axis] != value(node).shape[layout.axis]:
            raise NotPermutable(f"{node.name} expands the head axis (repeated K/V heads)")
        fixed = tuple((d - lead, i) for d, i in layout.fixed if d >= lead and source.shape[d - lead] != 1)
        return replace(layout, axis=axis, fixed=fixed)

    def _unslice(self, node: Node, layout: HeadLayout) -> HeadLayout:
        source, dim, start, _end, step = (list(node.args) + [None, None, 1])[:5]
        dim = _norm(dim, _rank(source))
        if dim not in layout.dims():
            return layout
        start = start or 0
        if not isinstance(start, int):
            raise NotPermutable(f"{node.name} slices the head axis at a symbolic offset")
        start = start + value(source).shape[dim] if start < 0 else start
        if dim == layout.axis:
            if step != 1:
                raise NotPermutable(f"{node.name} slices the head axis with step {step}")
            return replace(layout, offset=layout.offset + start)
        return replace(layout, fixed=tuple((d, start + i * step if d == dim else i) for d, i in layout.fixed))

    def _unsplit(self, node: Node, layout: HeadLayout) -> tuple[Node, HeadLayout]:
        split, index = node.args
        self.chain.add(split)
        source = split.args[0]
        dim = _norm(split.args[2] if len(split.args) > 2 else 0, _rank(source))
        if split.target is aten.unbind.int:
            dim = _norm(split.args[1] if len(split.args) > 1 else 0, _rank(source))
            moved = _move_dims(layout, lambda d: d + (d >= dim))
            return source, replace(moved, fixed=tuple(sorted(moved.fixed + ((dim, index),))))
        start = sum(part.shape[dim] for part in split.meta["val"][:index])
        if not isinstance(start, int):
            raise NotPermutable(f"{split.name} splits at a symbolic offset")
        if dim == layout.axis:
            return source, replace(layout, offset=layout.offset + start)
        if dim in layout.dims():
            raise NotPermutable(f"{split.name} splits an index-selected dimension")
        return source, layout

    def _projection_parameters(self, node: Node, layout: HeadLayout) -> list[tuple[Node, HeadLayout]]:
        """Output features of a projection are its weight's rows (linear) or columns
        (addmm/mm, GPT-2's Conv1D), and its bias entries."""
        if layout.axis != _rank(node) - 1 or layout.fixed:
            raise NotPermutable(f"heads are not along the output features of {node.name}")
        if node.target is aten.linear.default:
            weight, bias = node.args[1], (node.args[2] if len(node.args) > 2 else None)
            pairs = [(weight, replace(layout, axis=0))]
        else:
            weight = node.args[2] if node.target is aten.addmm.default else node.args[1]
            bias = node.args[0] if node.target is aten.addmm.default else None
            pairs = [(weight, replace(layout, axis=1))]
        if isinstance(bias, Node):
            pairs.append((bias, replace(layout, axis=value(bias).dim() - 1)))
        return pairs

    # ---- forward: from the attention output to the projection that consumes it
    def forward(self, node: Node, layout: HeadLayout) -> None:
        while True:
            users = [u for u in real_users(node) if u.target not in _METADATA]
            if len(users) != 1:
                raise NotPermutable(f"the attention output {node.name} has {len(users)} consumers, not one projection")
            user = users[0]
            if user.target in (aten.linear.default, aten.mm.default, aten.addmm.default):
                self._consume(user, node, layout)
                return
            layout = self._forward_layout(user, node, layout)
            self.chain.add(user)
            node = user

    def _forward_layout(self, user: Node, node: Node, layout: HeadLayout) -> HeadLayout:
        target = user.target
        if target in _UNARY and user.args[0] is node:
            return layout
        if target in _RESHAPES:
            return reshape_layout(layout, value(node).shape, value(user).shape)
        if target in _PERMUTES:
            perm = _permutation_of(user)
            return _move_dims(layout, lambda d: perm.index(d))
        if target in _ELEMENTWISE and _rank(user) == _rank(node):
            others = [x for x in user.args if x is not node]
            if all(self._operand(user, x, layout) is None for x in others):
                return layout
        raise NotPermutable(f"the attention output flows into {op_name(user)} ({user.name})")

    def _consume(self, projection: Node, node: Node, layout: HeadLayout) -> None:
        """Input features of the output projection: linear weight columns, addmm/mm weight rows."""
        linear = projection.target is aten.linear.default
        position = 1 if projection.target is aten.addmm.default else 0
        if projection.args[position] is not node or layout.axis != _rank(node) - 1 or layout.fixed:
            raise NotPermutable(f"heads are not along the input features of {projection.name}")
        weight = projection.args[1] if linear else projection.args[position + 1]
        self.consumers.add(projection)
        self.back(weight, replace(layout, axis=1 if linear else 0), "q")


def _tensor(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _check_exclusive(gm: torch.fx.GraphModule, walk: _Walk, attention: Node) -> None:
    """Every chain value feeds only the chain; every moved parameter is used by no other node."""
    allowed = walk.chain | walk.consumers | {attention}
    for node in walk.chain:
        outside = [u for u in real_users(node) if u not in allowed and u.target not in _METADATA]
        if outside:
            raise NotPermutable(f"{node.name} is also used by {outside[0].name} outside this attention")
    moved = {move.target for move in walk.moves}
    storages = {_tensor(gm, t).untyped_storage().data_ptr(): t for t in moved}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node in walk.chain:
            continue
        other = _tensor(gm, node.target)
        if isinstance(other, torch.Tensor) and other.untyped_storage().data_ptr() in storages:
            raise NotPermutable(f"parameter {storages[other.untyped_storage().data_ptr()]} is shared "
                                f"with {node.target} (tied weights)")


def find_head_moves(gm: torch.fx.GraphModule, attention: Node) -> HeadMoves:
    """The parameter moves that reorder the heads of ``attention``; raises
    :class:`NotPermutable` with the reason when its heads cannot be moved by weights."""
    q, k, v, mask = attention.args[:4]
    num_heads, num_kv_heads = value(q).shape[1], value(k).shape[1]
    walk = _Walk(gm)
    walk.back(q, HeadLayout(num_heads, axis=1), "q")
    walk.back(k, HeadLayout(num_kv_heads, axis=1), "kv")
    walk.back(v, HeadLayout(num_kv_heads, axis=1), "kv")
    walk.forward(attention, HeadLayout(num_heads, axis=1))
    _check_exclusive(gm, walk, attention)
    moves = list(dict.fromkeys(walk.moves))
    parameter_indices(gm, moves, {"q": list(range(num_heads)), "kv": list(range(num_kv_heads))})
    return HeadMoves(moves, mask_is_per_head(mask))


def mask_is_per_head(mask) -> bool:
    """Whether an attention mask differs between heads (so it must move with them)."""
    tensor = value(mask)
    return tensor is not None and tensor.dim() >= 3 and tensor.shape[-3] != 1


def parameter_indices(gm: torch.fx.GraphModule, moves: list[ParameterMove],
                      orders: dict[str, list[int]]) -> dict[str, tuple[int, torch.Tensor]]:
    """For each moved parameter, ``(axis, index)`` such that ``index_select(axis, index)``
    puts old head ``orders[role][i]`` at position ``i``. Raises when moves collide."""
    result = {}
    for target in dict.fromkeys(m.target for m in moves):
        mine = [m for m in moves if m.target == target]
        axes = {m.layout.axis for m in mine}
        tensor = _tensor(gm, target)
        if len(axes) != 1 or any(m.layout.fixed for m in mine):
            raise NotPermutable(f"parameter {target} would be permuted along several axes")
        axis = axes.pop()
        size = tensor.shape[axis]
        index = torch.arange(size)
        claimed = torch.zeros(size, dtype=torch.bool)
        for move in mine:
            lay = move.layout
            span = torch.arange(lay.width)
            order = torch.tensor(orders[move.role], dtype=torch.long)
            new = (lay.offset + torch.arange(lay.heads)[:, None] * lay.stride + span).flatten()
            old = (lay.offset + order[:, None] * lay.stride + span).flatten()
            if int(new.max()) >= size or bool(claimed[new].any()):
                raise NotPermutable(f"head ranges of {target} overlap or exceed its size {size}")
            claimed[new] = True
            index[new] = old
        result[target] = (axis, index)
    return result


def permute_parameters(gm: torch.fx.GraphModule, indices: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Replace each parameter by its permuted copy. New tensors, never in-place writes: the
    captured module shares its parameters with the user's model."""
    for target, (axis, index) in indices.items():
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        old = getattr(owner, name)
        new = old.detach().index_select(axis, index.to(old.device))
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        setattr(owner, name, new)
