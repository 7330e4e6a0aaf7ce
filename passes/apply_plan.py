"""apply_plan: take the head patterns and groups of a given plan instead of classifying.

Used to recompile with an edited plan (``sparsec.compile(..., plan=plan)``) and by the
bisect helper, which toggles layers and heads dense. Sites are matched by name; a site of
the graph that the given plan does not list stays dense, and the plan says so.
"""
from __future__ import annotations

import copy

import torch

from sparsec.ir.errors import PlanError
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.ir.plan import Plan


class ApplyPlan:
    name = "apply_plan"

    def __init__(self, plan: Plan):
        self.given = plan

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        given = {site.name: site for site in self.given.attention}
        applied = 0
        for site in ctx.plan.attention:
            source = given.get(site.name)
            if source is None:
                site.notes.append("not in the given plan: left dense")
                continue
            if (source.num_heads, source.num_kv_heads) != (site.num_heads, site.num_kv_heads):
                raise PlanError(
                    f"plan site {site.name} has {source.num_heads} heads / {source.num_kv_heads} KV heads, "
                    f"the model has {site.num_heads} / {site.num_kv_heads}; the plan belongs to another model")
            site.heads = source.heads_in_model_order()     # a fused plan numbers heads as permuted
            site.regroup()
            # Records of the decisions taken over; fusion's is redone for this capture.
            site.extra.update(copy.deepcopy(source.extra))
            site.search, site.merge = copy.deepcopy(source.search), copy.deepcopy(source.merge)
            applied += 1
        ctx.plan.recall_threshold = self.given.recall_threshold
        return PassResult(gm, False, {"sites_applied": applied})
