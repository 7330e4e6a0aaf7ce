"""merge_head_groups: fewer, wider head groups where the cost model says launches cost more.

Classification picks each head's cheapest pattern on its own, so heads of one family end
up with slightly different parameters (windows of 61 and 64 keys), and every distinct
instance is a launch: a 9-head SmolLM2 layer came out as 7 launches, predicted slower than
the one dense launch it replaced. Per site, greedily and while the site's predicted time
(:meth:`CostModel.site_seconds`, launches included, at the serving length) drops:

- **merge** two groups into one pattern whose mask holds both
  (:func:`.head_grouping.covering`: a family's own ``Pattern.merge`` — the wider window,
  both column sets — or a covering family), so every head keeps at least its recall;
- **densify** a group whose saving does not pay for its launch (its heads join the dense
  group, which is one launch for all of them).

A site still predicted no faster than all-dense (by the target's margin,
``CostProfile.min_site_saving``) becomes all-dense. Each changed head's
``reason`` says what happened; ``site.merge`` (:class:`~sparsec.ir.plan.MergeRecord`) records the site's predicted time
before and after. The length is ``compile(seq_len=...)`` (the serving length) or the
longest calibration length.
"""
from __future__ import annotations

import torch

from sparsec.analysis.cost_model import CostModel
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.patterns import get_pattern
from sparsec.patterns.base import baseline_pattern
from sparsec.patterns.fitting import worst_recall
from sparsec.ir.plan import AttentionSite, MergeRecord

from sparsec.passes.helpers.attention_sites import ATTENTION
from sparsec.passes.helpers.head_grouping import covering


class MergeHeadGroups:
    name = "merge_head_groups"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        cost = CostModel(ctx.target)
        nodes = {n.name for n in gm.graph.nodes if n.op == "call_function" and n.target == ATTENTION}
        merged = densified = 0
        decisions = {}
        for site in ctx.plan.attention:
            record = (merge_site(site, cost, ctx.serving_length(site.name), ctx.attention_stats.get(site.name))
                      if site.node in nodes else None)
            if record is None:
                continue
            merged += record.merges
            densified += record.heads_densified
            decisions[site.name] = record.to_dict()
            site.merge = record
        return PassResult(gm, bool(decisions), {"merges": merged, "heads_densified": densified}, decisions)


def merge_site(site: AttentionSite, cost: CostModel, n: int, stats) -> MergeRecord | None:
    """Merge (or densify) ``site``'s groups while its predicted time at ``n`` drops (the
    module docstring); None where there is nothing to merge (no sparse head, no length, a
    baseline that is not dense attention)."""
    if not n or all(h.is_dense for h in site.heads) or not get_pattern(baseline_pattern(site)[0]).computes_all:
        return None
    causal = site.effective_causal()
    groups = [(g.pattern, g.params, list(g.heads)) for g in site.instance_groups() if not g.is_dense]
    dense_heads = [h.head for h in site.heads if h.is_dense]

    def seconds(sparse, dense):
        shapes = [(kind, params, len(heads)) for kind, params, heads in sparse]
        return cost.site_seconds(shapes + ([("dense", {}, len(dense))] if dense else []), n, causal, site.head_dim)

    before = current = seconds(groups, dense_heads)
    merges = 0
    while groups:
        options = []
        for i, (kind, params, heads) in enumerate(groups):
            rest = groups[:i] + groups[i + 1:]
            options.append((seconds(rest, dense_heads + heads), "densify", rest, dense_heads + heads))
            for j in range(i + 1, len(groups)):
                other_kind, other_params, other_heads = groups[j]
                union_kind, union = covering(kind, params, other_kind, other_params)
                if not get_pattern(union_kind).computes_all:
                    joined = [g for k, g in enumerate(groups) if k not in (i, j)] + [
                        (union_kind, union, heads + other_heads)]
                    options.append((seconds(joined, dense_heads), "merge", joined, dense_heads))
        best = min(options, key=lambda option: option[0])
        if best[0] >= current * (1 - 1e-9):
            break
        current, action, groups, dense_heads = best
        merges += action == "merge"
    all_dense = seconds([], [h.head for h in site.heads])
    if not cost.site_pays(current, all_dense):
        groups, dense_heads, current = [], [h.head for h in site.heads], all_dense
    densified = sum(h.head in dense_heads and not h.is_dense for h in site.heads)
    _write(site, groups, dense_heads, cost, n, stats)
    return MergeRecord(seq_len=n, seconds_before=before, seconds_after=current, dense_seconds=all_dense,
                       merges=merges, groups=len(groups) + bool(dense_heads), heads_densified=densified)


def _write(site: AttentionSite, groups: list, dense_heads: list, cost: CostModel, n: int, stats) -> None:
    """Heads take their group's (possibly merged) parameters, or dense, with the reason."""
    by_head = {h.head: h for h in site.heads}
    for kind, params, heads in groups:
        pattern = get_pattern(kind)
        for index in heads:
            head = by_head[index]
            if (head.pattern, head.params) == (kind, params):
                continue
            head.assign(kind, params, head.reason + f"; widened to share one launch with heads {sorted(heads)} "
                                                    f"(cost model at N={n})")
            if stats is not None and stats.profiles:
                head.recall = round(worst_recall(pattern, stats.head(index), params), 6)
            head.density = round(float(pattern.density(params, n, site.effective_causal())), 6)
    for index in dense_heads:
        head = by_head[index]
        if not head.is_dense:
            head.assign("dense", {}, f"{head.pattern} saved less than its launch costs at N={n} on "
                                     f"{cost.target.name} (cost model): dense")
            head.recall, head.density = 1.0, 1.0
    site.regroup()
