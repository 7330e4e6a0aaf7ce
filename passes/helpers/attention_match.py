"""Recognise one attention in an aten graph and describe it in canonical form.

Two anchors: an ``aten.scaled_dot_product_attention`` node, or a softmax in the eager form
``softmax(mask(scale * q @ kᵀ)) @ v``. Variants are folded into parameters before the one
canonical form is checked, instead of being spelled as separate patterns:

- scale: ``mul``/``div`` by a constant on the scores, on q or on k (``sqrt(d)`` constants too)
- mask: ``scores + additive``, ``masked_fill(bool, -inf)``, ``where(bool, scores, -inf)``
- upcasts and no-op copies around q, k, v, the scores and the probabilities; dropout in eval
- GQA: k/v head repeats (``repeat_kv``, ``repeat_interleave``, ``expand``), see ``repeat_kv``

Logit soft-capping (``tanh(scores / cap) * cap``, Gemma 2) is not folded: such a site is a
near miss with that reason and stays dense.

A subgraph that looks like attention but breaks a check raises :class:`MatchFailure` with
the reason, which the pass reports as a near miss (like onnxscript's ``MatchResult.fail``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from sparsec.passes.helpers.graph_utils import (arguments, constant_value, is_call, is_cast, op_name, real_users, same_shape,
                          same_size, scale_factor, skip_identity, value)
from sparsec.passes.helpers.repeat_kv import find_head_repeat

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_MATMUL_LIKE = (aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.mm.default, aten.einsum.default)
# A masked_fill/where value at or below this masks (HF uses finfo.min, older code -1e4 or -1e9).
_MASK_FILL_LIMIT = -1e4


class MatchFailure(Exception):
    """The subgraph is attention-like but not in a form sparsec can rewrite; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Operand:
    """An input of the canonical node: ``node`` with ``ops`` (target, extra args) applied in order."""

    node: Node
    ops: tuple = ()

    def value(self) -> torch.Tensor:
        """The operand's fake tensor."""
        result = value(self.node)
        for target, extra in self.ops:
            result = target(result, *extra)
        return result


@dataclass
class AttentionMatch:
    """One attention in canonical form: ``sparsec.attention(q, k, v, mask, scale, causal)``
    replaces ``output``; ``interior`` are the matched nodes that become dead."""

    source: str                      # "sdpa" | "eager"
    anchor: Node                     # the SDPA or softmax node
    output: Node
    q: Operand
    k: Operand
    v: Operand
    mask: Operand | None
    scale: float
    causal: bool
    interior: list[Node]
    out_dtype: torch.dtype | None = None   # cast the result back to the original output dtype
    folded: list[str] = field(default_factory=list)


def _peel_operand(node: Node, folded: list[str], what: str, scales: bool = True) -> tuple[Node, float]:
    """Strip float casts and (when ``scales``) constant scales off q, k or v."""
    scale = 1.0
    while True:
        found = scale_factor(node) if scales else None
        if found is not None:
            node, factor = found
            scale *= factor
            folded.append(f"scale {factor:.6g} on {what}")
        elif is_cast(node):
            source, cast = value(node.args[0]).dtype, value(node).dtype
            if source != cast:
                folded.append(f"{what} cast {source} -> {cast} stripped")
            node = node.args[0]
        else:
            return node, scale


def _untranspose_key(node: Node, folded: list[str]) -> tuple[Operand, float]:
    """From ``kᵀ`` (``[B, H, D, N]``, maybe scaled) back to ``k`` (``[B, H, N, D]``) and k's
    scale: through transposes and permutes until one of them yields k, or else a new permute."""
    rank = value(node).dim()
    identity = list(range(rank))
    permutation, scale = identity, 1.0      # kᵀ dim i is node dim permutation[i]
    while True:
        node, factor = _peel_operand(node, folded, "k")
        scale *= factor
        node = skip_identity(node)
        to_key = permutation[:-2] + [permutation[-1], permutation[-2]]
        if to_key == identity:
            return Operand(node), scale
        if is_call(node, aten.transpose.int):
            a, b = (d % rank for d in node.args[1:3])
            step = list(identity)
            step[a], step[b] = b, a
        elif is_call(node, aten.permute.default):
            step = [d % rank for d in node.args[1]]
        else:
            break
        permutation = [step[d] for d in permutation]
        node = node.args[0]
    if permutation == identity:
        raise MatchFailure(f"the second operand of q @ kᵀ ({op_name(node)} {node.name}) is not a transposed key")
    return Operand(node, ((aten.permute.default, (to_key,)),)), scale


def _only_user(node: Node, consumer: Node) -> None:
    users = real_users(node)
    if users != [consumer]:
        others = ", ".join(u.name for u in users if u is not consumer)
        raise MatchFailure(f"{node.name} ({op_name(node)}) inside the attention is also used by {others}")


def _mask_fill_value(raw, where: str) -> float:
    fill = constant_value(raw)
    if fill is None or fill > _MASK_FILL_LIMIT:
        raise MatchFailure(f"{where} fills with {fill if fill is not None else op_name(raw)}, "
                           f"not -inf or a large negative constant, so it does not mask")
    return fill


def _keeps_shape(scores, masked: Node) -> None:
    if not isinstance(scores, Node) or not same_shape(value(scores).shape, value(masked).shape):
        raise MatchFailure(f"{masked.name} ({op_name(masked)}) broadcasts the scores to a larger shape")


def _keep_mask(masked: Node) -> Operand:
    """The bool keep-mask (True = attend) of a ``masked`` (True = hide) tensor."""
    negated = is_call(masked, aten.logical_not.default, aten.bitwise_not.default)
    if negated and value(masked.args[0]).dtype == torch.bool:
        return Operand(masked.args[0])
    return Operand(masked, ((aten.logical_not.default, ()),))


def _peel_scores(node: Node, consumer: Node) -> tuple[Node, list]:
    """Walk from the softmax input back to ``q @ kᵀ``. Returns the matmul and the steps
    between, innermost first: ("scale", node, factor), ("cast", node, None),
    ("add", node, mask), ("keep", node, Operand)."""
    _only_user(node, consumer)
    if is_call(node, aten.matmul.default):
        return node, []
    if is_cast(node) or skip_identity(node) is not node:
        inner, steps = _peel_scores(node.args[0], node)
        return inner, steps + [("cast", node, None)]
    if (found := scale_factor(node)) is not None:
        inner, steps = _peel_scores(found[0], node)
        return inner, steps + [("scale", node, found[1])]
    if is_call(node, aten.add.Tensor):
        if arguments(node)["alpha"] != 1:
            raise MatchFailure(f"{node.name} adds the mask with alpha={arguments(node)['alpha']}")
        failure = None
        for scores, mask in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if value(mask) is None or value(scores) is None or not same_shape(value(scores).shape, value(node).shape):
                continue
            try:
                inner, steps = _peel_scores(scores, node)
            except MatchFailure as error:
                failure = failure or error
                continue
            return inner, steps + [("add", node, mask)]
        raise failure or MatchFailure(f"{node.name} adds {op_name(node.args[1])} to {op_name(node.args[0])}: "
                                      "not a mask tensor broadcast to the scores' shape")
    if is_call(node, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        args = arguments(node)
        _mask_fill_value(args["value"], f"masked_fill {node.name}")
        _keeps_shape(args["input"], node)
        inner, steps = _peel_scores(args["input"], node)
        return inner, steps + [("keep", node, _keep_mask(args["mask"]))]
    if is_call(node, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
        condition, kept, dropped = node.args
        if constant_value(kept) is not None:      # where(masked, fill, scores)
            _mask_fill_value(kept, f"where {node.name}")
            _keeps_shape(dropped, node)
            inner, steps = _peel_scores(dropped, node)
            return inner, steps + [("keep", node, _keep_mask(condition))]
        _mask_fill_value(dropped, f"where {node.name}")
        _keeps_shape(kept, node)
        inner, steps = _peel_scores(kept, node)
        return inner, steps + [("keep", node, Operand(condition))]
    if is_call(node, aten.tanh.default):
        raise MatchFailure(_soft_cap_reason(node))
    raise MatchFailure(f"the softmax input comes from {op_name(node)} ({node.name}), not from a "
                       "scaled and masked q @ kᵀ")


def _soft_cap_reason(tanh: Node) -> str:
    """Why a ``tanh`` on the scores is not folded: logit soft-capping (Gemma 2, Grok)."""
    inner = tanh.args[0]
    found = scale_factor(inner)
    cap = f"{1.0 / found[1]:.6g}" if found is not None and found[1] > 0 else "cap"
    return (f"logit soft-capping tanh(scores / {cap}) * {cap} ({tanh.name}) before the softmax: "
            "sparsec's canonical attention has no soft-cap parameter, so this attention stays dense")


def _fold_steps(steps: list, q_dtype: torch.dtype, folded: list[str]) -> tuple[float, Operand | None]:
    """Scale and mask of the scores, from the matmul outwards."""
    scale, mask, additive = 1.0, None, False
    for kind, node, payload in steps:
        if kind == "scale":
            # -inf stays -inf under a positive scale; an additive mask would be rescaled.
            if mask is not None and (additive or payload <= 0):
                raise MatchFailure(f"{node.name} scales the scores by {payload:.6g} after the "
                                   f"{'additive ' if additive else ''}mask was applied")
            scale *= payload
            folded.append(f"scale {payload:.6g} on scores")
        elif kind == "cast":
            folded.append(f"scores {op_name(node)} to {value(node).dtype} stripped")
        elif mask is not None:
            raise MatchFailure(f"{node.name} applies a second mask; sparsec folds one mask per attention")
        elif kind == "add":
            if not value(payload).dtype.is_floating_point:
                raise MatchFailure(f"{node.name} adds a {value(payload).dtype} tensor to the scores, "
                                   "not an additive mask")
            cast = () if value(payload).dtype == q_dtype else ((aten.to.dtype, (q_dtype,)),)
            mask, additive = Operand(payload, cast), True
            folded.append(f"additive mask {payload.name}")
        else:
            mask = payload
            folded.append(f"{op_name(node)} {node.name} -> bool keep-mask")
    return scale, mask


def _follow_probabilities(softmax: Node, folded: list[str]) -> tuple[Node, list[Node]]:
    """From the softmax forward through casts and eval dropout to ``probs @ v``."""
    node, interior = softmax, []
    while True:
        users = real_users(node)
        if len(users) != 1:
            raise MatchFailure(f"the attention probabilities ({node.name}) have {len(users)} users "
                               "(are they returned, e.g. output_attentions=True?)")
        user = users[0]
        if is_call(user, aten.dropout.default):
            p, train = arguments(user)["p"], arguments(user)["train"]
            if train and p > 0:
                raise MatchFailure(f"dropout {user.name} (p={p}) is active: capture the model in eval mode")
            folded.append(f"dropout p={p} (eval) stripped")
        elif is_cast(user) or skip_identity(user) is not user:
            if value(user).dtype != value(node).dtype:
                folded.append(f"probabilities cast {value(node).dtype} -> {value(user).dtype} stripped")
        elif is_call(user, aten.matmul.default) and user.args[0] is node:
            return user, interior
        else:
            raise MatchFailure(f"the softmax output feeds {op_name(user)} ({user.name}), not probs @ v")
        interior.append(user)
        node = user


def _check_shapes(qv: torch.Tensor, kv: torch.Tensor, vv: torch.Tensor) -> None:
    """q ``[B, Hq, Nq, D]``, k ``[B, Hkv, Nk, D]``, v ``[B, Hkv, Nk, Dv]`` (fake values)."""
    if not (qv.dim() == kv.dim() == vv.dim() == 4):
        raise MatchFailure(f"q/k/v are {qv.dim()}/{kv.dim()}/{vv.dim()}-d, not [B, H, N, D]")
    if not (qv.dtype == kv.dtype == vv.dtype):
        raise MatchFailure(f"q/k/v dtypes differ: {qv.dtype}, {kv.dtype}, {vv.dtype}")
    if not (same_size(qv.shape[0], kv.shape[0]) and same_size(kv.shape[0], vv.shape[0])):
        raise MatchFailure(f"q/k/v batch sizes differ (or broadcast): {qv.shape[0]}, {kv.shape[0]}, {vv.shape[0]}")
    if not (same_size(qv.shape[3], kv.shape[3]) and same_size(kv.shape[2], vv.shape[2])):
        raise MatchFailure(f"shapes do not chain: q {tuple(qv.shape)}, k {tuple(kv.shape)}, v {tuple(vv.shape)}")
    if not same_size(kv.shape[1], vv.shape[1]):
        raise MatchFailure(f"k has {kv.shape[1]} heads and v {vv.shape[1]}")
    if not (isinstance(qv.shape[1], int) and isinstance(kv.shape[1], int) and qv.shape[1] % kv.shape[1] == 0):
        raise MatchFailure(f"{qv.shape[1]} query heads are not a static multiple of {kv.shape[1]} kv heads")


def _strip_head_repeat(k: Node, v: Node, folded: list[str]) -> tuple[Node, Node]:
    """k/v with ``Hkv`` heads when both carry the same grouped head repeat; else as given."""
    key, val = find_head_repeat(k), find_head_repeat(v)
    if key is None and val is None:
        return k, v
    if key is None or val is None or key.factor != val.factor:
        folded.append("k and v heads are not repeated alike; kept repeated k/v")
        return k, v
    if not (key.grouped and val.grouped):
        tiled = key if not key.grouped else val
        folded.append(f"k/v {tiled.form} x{tiled.factor} tiles heads (query head h reads kv head h % Hkv); "
                      "kept repeated k/v")
        return k, v
    folded.append(f"k/v {key.form} x{key.factor} stripped" + (" (GQA)" if key.factor > 1 else " (no-op)"))
    return key.base, val.base


def _result_dtype(output: Node, q: Node) -> torch.dtype | None:
    dtype = value(output).dtype
    return None if dtype == value(q).dtype else dtype


def match_eager(softmax: Node) -> AttentionMatch:
    """``softmax(mask(scale * q @ kᵀ)) @ v`` around ``softmax`` in canonical form."""
    args = arguments(softmax)
    rank = value(softmax).dim()
    if args["dim"] % rank != rank - 1:
        raise MatchFailure(f"softmax over dim {args['dim']}, not the key dim (the last)")
    folded: list[str] = []
    if value(softmax).dtype != value(args["input"]).dtype:
        folded.append(f"softmax upcast to {value(softmax).dtype} stripped")
    output, after = _follow_probabilities(softmax, folded)
    scores_matmul, steps = _peel_scores(args["input"], softmax)
    if value(scores_matmul).dim() != 4:
        raise MatchFailure(f"the scores are {value(scores_matmul).dim()}-d; sparsec needs [B, H, Nq, Nk] "
                           "scores (heads folded into the batch cannot be told apart)")
    q_raw, k_transposed = scores_matmul.args
    q, q_scale = _peel_operand(q_raw, folded, "q")
    k_operand, k_scale = _untranspose_key(k_transposed, folded)
    k = k_operand.node
    v, _ = _peel_operand(output.args[1], folded, "v", scales=False)
    _check_shapes(value(q), k_operand.value(), value(v))
    scale, mask = _fold_steps(steps, value(q).dtype, folded)
    if not k_operand.ops:
        k, v = _strip_head_repeat(k, v, folded)
    return AttentionMatch(
        source="eager", anchor=softmax, output=output, q=Operand(q), k=Operand(k, k_operand.ops),
        v=Operand(v), mask=mask, scale=scale * q_scale * k_scale, causal=False,
        interior=[scores_matmul] + [node for _kind, node, _payload in steps] + [softmax] + after + [output],
        out_dtype=_result_dtype(output, q), folded=folded)


def match_sdpa(node: Node) -> AttentionMatch:
    """``aten.scaled_dot_product_attention`` in canonical form."""
    args = arguments(node)
    q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
    folded: list[str] = []
    if args["dropout_p"] > 0:
        raise MatchFailure(f"dropout_p={args['dropout_p']} is active in scaled_dot_product_attention "
                           "(it ignores eval mode); pass dropout_p=0.0 when not training")
    _check_shapes(value(q), value(k), value(v))
    scale = args["scale"]
    if scale is None:
        head_dim = value(q).shape[-1]
        if not isinstance(head_dim, int):
            raise MatchFailure(f"no scale given and the head dim {head_dim} is symbolic")
        scale = 1.0 / math.sqrt(head_dim)
        folded.append(f"default scale 1/sqrt({head_dim})")
    if args["enable_gqa"]:
        folded.append("enable_gqa")
    k, v = _strip_head_repeat(k, v, folded)
    if args["is_causal"]:
        folded.append("is_causal")
    return AttentionMatch(
        source="sdpa", anchor=node, output=node, q=Operand(q), k=Operand(k), v=Operand(v),
        mask=None if mask is None else Operand(mask), scale=float(scale), causal=bool(args["is_causal"]),
        interior=[node], folded=folded)


def is_attention_like(softmax: Node, back: int = 6, forward: int = 4) -> bool:
    """Whether a matmul feeds the softmax and one consumes it within a few ops: worth a
    near-miss report when the softmax does not match."""
    def reaches(start: list[Node], step, depth: int) -> bool:
        frontier = start
        for _ in range(depth):
            if any(is_call(n, *_MATMUL_LIKE) for n in frontier):
                return True
            frontier = [m for n in frontier for m in step(n) if isinstance(m, Node)]
        return False

    return (reaches([softmax.args[0]], lambda n: n.all_input_nodes, back)
            and reaches(list(softmax.users), lambda n: n.users, forward))
