"""canonicalize: rewrite every recognised attention into one ``sparsec.attention`` node.

Anchors are ``aten.scaled_dot_product_attention`` nodes and softmaxes; ``attention_match``
folds scale, mask, upcasts, eval dropout and GQA head repeats and checks the one canonical
form. An attention-like softmax (a matmul feeds it, a matmul consumes it) that fails a check
stays dense and is listed in ``plan.unmatched`` with the reason. ``sparsec.attention``
nodes already in the graph are kept as they are. A graph with near misses but no recognised
attention compiles to the dense model with a warning that lists them; a graph with no
attention-like structure at all raises :class:`NoAttentionError`.
"""
from __future__ import annotations

import warnings

import torch
from torch._guards import detect_fake_mode
from torch.fx import Node
from torch.utils import _pytree as pytree

from sparsec.ir.errors import NoAttentionError
from sparsec.passes.infra.pass_manager import CompileContext, PassResult

from sparsec.passes.helpers.attention_match import (SDPA, SOFTMAX, AttentionMatch, MatchFailure, Operand, is_attention_like,
                              match_eager, match_sdpa)
from sparsec.passes.helpers.attention_sites import ATTENTION, module_path, register_sites
from sparsec.passes.helpers.graph_utils import is_call

aten = torch.ops.aten


def _add_node(graph: torch.fx.Graph, target, args: tuple, anchor: Node) -> Node:
    """A call_function node with its fake value and the anchor's module and source meta."""
    node = graph.call_function(target, args)
    fake_args = pytree.tree_map_only(Node, lambda n: n.meta["val"], args)
    with detect_fake_mode(pytree.tree_leaves(fake_args)):
        node.meta["val"] = target(*fake_args)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in anchor.meta:
            node.meta[key] = anchor.meta[key]
    return node


def _emit(graph: torch.fx.Graph, operand: Operand | None, anchor: Node) -> Node | None:
    if operand is None:
        return None
    node = operand.node
    for target, extra in operand.ops:
        node = _add_node(graph, target, (node, *extra), anchor)
    return node


def _rewrite(gm: torch.fx.GraphModule, match: AttentionMatch) -> Node:
    """Replace the matched subgraph with one ``sparsec.attention`` node."""
    graph = gm.graph
    with graph.inserting_before(match.output):
        q, k, v, mask = (_emit(graph, operand, match.anchor) for operand in (match.q, match.k, match.v, match.mask))
        # A mask of rank < 2 (a learned per-key bias [N]) broadcasts like [1, N]; later passes
        # read a mask's query and key axes, so it gets both.
        while mask is not None and mask.meta["val"].dim() < 2:
            mask = _add_node(graph, aten.unsqueeze.default, (mask, 0), match.anchor)
        attention = _add_node(graph, ATTENTION, (q, k, v, mask, match.scale, match.causal), match.anchor)
        result = attention
        if match.out_dtype is not None:
            result = _add_node(graph, aten.to.dtype, (attention, match.out_dtype), match.anchor)
    match.output.replace_all_uses_with(result)
    for node in reversed(match.interior):
        for check in [u for u in node.users if u.target is aten._assert_tensor_metadata.default]:
            graph.erase_node(check)
        graph.erase_node(node)
    return attention


def _shape(node: Node) -> list:
    return [size if isinstance(size, int) else str(size) for size in node.meta["val"].shape]


def _describe(match: AttentionMatch, node: Node) -> dict:
    return {"node": node.name, "module": module_path(match.anchor), "source": match.source,
            "replaced": match.anchor.name, "scale": match.scale, "causal": match.causal,
            "mask": None if node.args[3] is None else node.args[3].name,
            "q": _shape(node.args[0]), "k": _shape(node.args[1]),
            "folded": match.folded}


class Canonicalize:
    """Every attention becomes one ``torch.ops.sparsec.attention`` node; see the module docstring."""

    name = "canonicalize"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        sources, sites, near_misses = {}, [], []
        for anchor in list(gm.graph.nodes):
            if is_call(anchor, SDPA):
                matcher = match_sdpa
            elif is_call(anchor, *SOFTMAX) and is_attention_like(anchor):
                matcher = match_eager
            else:
                continue
            try:
                match = matcher(anchor)
            except Exception as error:  # noqa: BLE001 — an unforeseen graph must not stop the compile: it stays dense
                reason = (error.reason if isinstance(error, MatchFailure)
                          else f"matcher error {type(error).__name__}: {error}")
                near_misses.append({"node": anchor.name, "module": module_path(anchor), "reason": reason})
                continue
            node = _rewrite(gm, match)
            sources[node.name] = match.source
            sites.append(_describe(match, node))
        if sites:
            gm.graph.eliminate_dead_code()
        ctx.plan.unmatched.extend(near_misses)
        ctx.plan.attention = register_sites(gm, sources)
        folded = {site["node"]: site["folded"] for site in sites}
        for site in ctx.plan.attention:
            site.notes.extend(folded.get(site.node, []))
        if not ctx.plan.attention:
            recognised = ("sparsec recognises F.scaled_dot_product_attention and the eager "
                          "softmax(q @ k^T) @ v form, or call torch.ops.sparsec.attention directly.")
            if not near_misses:
                raise NoAttentionError(f"no attention found in the captured graph. {recognised}")
            # Attention-like structure that is not recognised (e.g. Gemma 2's soft-capping):
            # the model still compiles, dense, and says why, rather than failing as a whole.
            missed = "".join(f"\n  {m['node']} in {m['module']}: {m['reason']}" for m in near_misses)
            warnings.warn(f"sparsec: no attention was recognised, so the compiled model is the dense "
                          f"model. {recognised} Near misses (also in plan.unmatched):{missed}",
                          stacklevel=2)
        stats = {"attention_sites": len(ctx.plan.attention),
                 "sdpa": sum(s["source"] == "sdpa" for s in sites),
                 "eager": sum(s["source"] == "eager" for s in sites),
                 "near_misses": len(near_misses)}
        return PassResult(gm, bool(sites), stats, {"sites": sites, "unmatched": near_misses})
