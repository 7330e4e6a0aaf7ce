"""fold_causal_mask: replace an in-graph causal mask by ``causal=True``.

Hugging Face models build their causal mask inside the graph (an N×N boolean or additive
tensor) instead of passing ``is_causal``; kept, it costs O(N²) memory and makes every
kernel read mask tiles. A site's mask is folded when both hold:

- calibration saw it equal the causal mask on every batch (``extra["mask_is_causal"]``,
  written by ``calibrate``), and
- it is a function of input *shapes* only: walking its producers reaches no input tensor
  except through ``sym_size`` (so padding masks, which read ``attention_mask``, are never
  folded).

Then the same shapes always give the same mask, and at the calibration shapes it was
causal. Sites that fail either check keep their mask; the plan says why.
"""
from __future__ import annotations

import torch

from sparsec.pass_manager import CompileContext, PassResult

SHAPE_ONLY_TARGETS = (torch.ops.aten.sym_size.int,)


def _reads_input_values(mask: torch.fx.Node) -> str | None:
    """The first input placeholder whose values the mask depends on, or None."""
    stack, seen = [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return node.name
        if node.op == "call_function" and node.target in SHAPE_ONLY_TARGETS:
            continue
        stack.extend(node.all_input_nodes)
    return None


class FoldCausalMask:
    name = "fold_causal_mask"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        folded, decisions = 0, {}
        for site in ctx.plan.attention:
            node = nodes.get(site.node)
            if node is None or not site.has_mask:
                continue
            mask = node.args[3]
            if not site.extra.get("mask_is_causal"):
                decisions[site.name] = "kept: the mask is not the causal mask on the calibration data"
                continue
            source = _reads_input_values(mask)
            if source is not None:
                decisions[site.name] = f"kept: the mask depends on the values of input {source!r} (padding)"
                site.notes.append(f"causal mask kept as a tensor: it reads input {source!r}")
                continue
            node.args = (*node.args[:3], None, node.args[4], True)
            site.causal, site.has_mask = True, False
            site.notes.append("in-graph causal mask folded into causal=True")
            decisions[site.name] = "folded"
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, folded > 0, {"masks_folded": folded}, decisions)
