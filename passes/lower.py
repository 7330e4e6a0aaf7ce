"""lower: bind every attention site to the kernels its plan asks for.

A site whose heads are all dense keeps its ``sparsec.attention`` node (dense SDPA: on a
GPU that is already FlashAttention). Any other site becomes one
``sparsec.sparse_attention`` node carrying the site's group table, so every group runs as
one launch; the op's device kernels are chosen at run time by tensor device. The backend
each group runs on the target at the serving length (``CostModel.backend``: FlashAttention-4
or Triton on GPUs by their measured rates, the block-sparse CPU path elsewhere) is recorded in
``site.extra["backends"]``; at run time the same choice is made at the input's length, FA4
serving its groups where it is installed and the inputs are fp16 / bf16 without an explicit
mask.
"""
from __future__ import annotations

import torch

from sparsec.analysis.cost_model import CostModel
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.ir.plan import encode_groups

from sparsec.passes.helpers.attention_sites import ATTENTION, SPARSE_ATTENTION


def lower_site(gm: torch.fx.GraphModule, node: torch.fx.Node, site) -> torch.fx.Node:
    """Replace the site's ``sparsec.attention`` ``node`` by a ``sparse_attention`` node
    running ``site.groups``; the site then names the new node."""
    with gm.graph.inserting_after(node):
        sparse = gm.graph.call_function(SPARSE_ATTENTION, (*node.args, encode_groups(site.groups)))
    sparse.meta.update(node.meta)
    node.replace_all_uses_with(sparse)
    gm.graph.erase_node(node)
    site.node = sparse.name
    return sparse


class Lower:
    name = "lower"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        lowered, decisions = 0, {}
        cost = CostModel(ctx.target)
        for site in ctx.plan.attention:
            node = nodes.get(site.node)
            if node is None or node.target != ATTENTION:
                continue
            if not site.groups:
                site.regroup()
            if all(group.is_dense for group in site.groups):
                site.extra["lowered"] = "dense attention (scaled_dot_product_attention)"
                decisions[site.name] = "dense"
                continue
            lower_site(gm, node, site)
            n = ctx.serving_length(site.name)
            backends = [cost.backend(g.pattern, g.params, n, site.effective_causal(), site.head_dim,
                                     whole_site=len(site.groups) == 1) for g in site.groups]
            launches = ("fa4" in backends) + sum(backend != "fa4" for backend in backends)
            site.extra["backends"] = backends
            site.extra["lowered"] = f"sparse_attention, {launches} launch(es)"
            decisions[site.name] = [f"{g.pattern}:{g.heads}@{b}" for g, b in zip(site.groups, backends)]
            lowered += 1
        return PassResult(gm, lowered > 0, {"sites_lowered_sparse": lowered,
                                            "sites_dense": len(ctx.plan.attention) - lowered}, decisions)
