"""Small questions about aten-level fx nodes that graph matchers ask: a node's arguments by
schema name, its fake value, whether it is a cast / no-op / constant scale, whether two
(possibly symbolic) sizes are provably equal."""
from __future__ import annotations

import math

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten

# Ops that return their input's values unchanged.
_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}
_INT64_MAX = 2**63 - 1


def arguments(node: Node) -> dict:
    """The node's arguments by schema name, defaults filled in (``self`` is ``input``)."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise ValueError(f"cannot normalise the arguments of {node.format_node()}")
    return normalized.kwargs


def value(node) -> torch.Tensor | None:
    """The node's fake tensor (``meta["val"]``), or None for non-nodes and non-tensors."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_size(a, b) -> bool:
    """Whether two sizes (ints or SymInts) are equal for every shape the graph accepts."""
    return statically_known_true(a == b)


def same_shape(a, b) -> bool:
    """Whether two shapes are equal for every shape the graph accepts."""
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def op_name(node) -> str:
    """A short name for messages: ``matmul.default``, ``get_attr weight``, or the value's repr."""
    if not isinstance(node, Node):
        return repr(node)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def real_users(node: Node) -> list[Node]:
    """Users that consume the value, ignoring ``_assert_tensor_metadata`` checks."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def is_call(node, *targets) -> bool:
    """Whether ``node`` calls one of ``targets``."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_cast(node) -> bool:
    """A floating-point dtype cast that keeps device and layout."""
    if not is_call(node, *_CASTS):
        return False
    source, result = value(node.args[0]), value(node)
    return (source is not None and result is not None and source.device == result.device
            and source.dtype.is_floating_point and result.dtype.is_floating_point)


def is_full_slice(node) -> bool:
    """A ``slice`` that keeps the whole dimension (``x[:, :]`` in the source)."""
    if not is_call(node, aten.slice.Tensor):
        return False
    args = arguments(node)
    source = value(args["input"])
    dim = args["dim"] % source.dim()
    end = args["end"]
    return (args["start"] in (None, 0) and args["step"] == 1
            and (end is None or (isinstance(end, int) and end >= _INT64_MAX)
                 or same_size(end, source.shape[dim])))


def skip_identity(node):
    """Follow no-op slices, clones and contiguous copies back to the tensor they copy."""
    while is_call(node, *_IDENTITY) or is_full_slice(node):
        node = node.args[0]
    return node


def constant_value(arg) -> float | None:
    """The value of a Python number or of a node that is a uniform constant (a 0-d tensor
    constant, ``scalar_tensor``, ``full``, or sqrt/reciprocal/... of those); else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, Node):
        return None
    if arg.op == "get_attr":
        tensor = arg.graph.owning_module
        for part in arg.target.split("."):
            tensor = getattr(tensor, part, None)
        return float(tensor.item()) if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 else None
    if arg.op != "call_function":
        return None
    if arg.target is aten.scalar_tensor.default:
        return constant_value(arg.args[0])
    if arg.target in (aten.full.default, aten.full_like.default):
        return constant_value(arg.args[1])
    if is_call(arg, aten.lift_fresh_copy.default, aten.detach_.default, *_IDENTITY, *_CASTS):
        return constant_value(arg.args[0])
    unary = {aten.sqrt.default: math.sqrt, aten.rsqrt.default: lambda x: 1 / math.sqrt(x),
             aten.reciprocal.default: lambda x: 1 / x, aten.neg.default: lambda x: -x}
    if arg.target in unary:
        inner = constant_value(arg.args[0])
        return None if inner is None else unary[arg.target](inner)
    return None


def scale_factor(node) -> tuple[Node, float] | None:
    """``(x, c)`` when ``node`` is ``x * c`` or ``x / c`` for a constant ``c``, else None."""
    if is_call(node, aten.mul.Tensor, aten.mul.Scalar):
        for x, c in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            factor = constant_value(c)
            if factor is not None and value(x) is not None and same_shape(value(x).shape, value(node).shape):
                return x, factor
    if is_call(node, aten.div.Tensor, aten.div.Scalar):
        factor = constant_value(node.args[1])
        source = value(node.args[0])
        if factor and source is not None and same_shape(source.shape, value(node).shape):
            return node.args[0], 1.0 / factor
    return None
