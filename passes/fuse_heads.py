"""fuse_heads: heads that share a pattern run together, as one contiguous slice.

Per-head patterns are only fast when heads with the same pattern run in one launch
(Sparse-vDiT fuses the heads of a layer that share a strategy). For every
``sparsec.attention`` site this pass

1. groups the heads by pattern instance (:meth:`AttentionSite.instance_groups`), optionally merging groups
   into a covering pattern when the cost model says the saved launch pays for the added
   pairs, bounded by ``max_groups_per_layer``;
2. chooses a head order in which each group is a contiguous slice. With GQA the key/value
   heads move as units with their query heads, so when the query heads of one KV head
   fall into different groups a group may stay split. It then keeps one launch with a
   head-index list (``gqa_split="head_index"``, the default: the kernels read heads through
   the group table) or becomes several contiguous sub-groups (``gqa_split="subgroups"``,
   for kernels that need slices), which costs several times the launches (measured in
   docs/benchmarks.md, "Head fusion");
3. realises the order at no run-time cost by permuting the q/k/v projection rows and the
   output projection's input columns (MoA's offline permutation, :mod:`.head_permutation`),
   or, where the weights cannot be permuted, by ``fallback``: ``"head_index"`` (no data
   movement: the group table lists each group's original heads; the kernels index heads
   through it) or ``"gather"`` (one ``index_select`` on q/k/v and one on the output).

The site records ``site.fusion`` (:class:`~sparsec.ir.plan.FuseRecord`): the strategy
("weights", "gather", "head_index" or "none"), the head order (head ``i`` of the site is
original head ``head_permutation[i]``; read it with :meth:`AttentionSite.head_permutation`)
and why.
``lower`` then emits one ``sparse_attention`` per site whose group table has one entry —
one launch — per group.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from sparsec.analysis.cost_model import CostModel
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.patterns import instance_key
from sparsec.ir.plan import AttentionSite, FuseRecord, HeadGroup

from sparsec.passes.helpers.attention_sites import ATTENTION
from sparsec.passes.helpers.head_grouping import merge_groups
from sparsec.passes.helpers.head_permutation import (NotPermutable, find_head_moves, mask_is_per_head, parameter_indices,
                               permute_parameters)

aten = torch.ops.aten

STRATEGIES = ("weights", "gather", "head_index", "none")


# -- head order ------------------------------------------------------------------------------

def _runs(positions: list[int]) -> list[list[int]]:
    """Split sorted positions into runs of consecutive integers."""
    runs = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def count_runs(order: list[int], group_of: list[int]) -> int:
    """Contiguous same-group stretches when heads run in ``order``."""
    return sum(1 for i, h in enumerate(order) if i == 0 or group_of[h] != group_of[order[i - 1]])


def arrange_heads(group_of: list[int], per_kv: int) -> list[int]:
    """A head order (position ``i`` runs head ``order[i]``) that keeps the ``per_kv`` query
    heads of each KV head together — the only orders weights can realise under GQA — and
    leaves each group in as few contiguous stretches as it can.

    Greedy chaining of KV units: continue the last group if a unit has it (a unit of that
    group alone first), inside a unit put the continuing group first and last the group
    that most remaining units share; tried from one unit of each distinct group mix."""
    num_heads = len(group_of)
    if per_kv == 1:
        return sorted(range(num_heads), key=lambda h: (group_of[h], h))
    units = [list(range(u * per_kv, (u + 1) * per_kv)) for u in range(num_heads // per_kv)]
    colours = [frozenset(group_of[h] for h in unit) for unit in units]
    starts = list({c: u for u, c in reversed(list(enumerate(colours)))}.values())
    best = list(range(num_heads))
    for start in starts:
        order = _chain_units(units, colours, group_of, start)
        if count_runs(order, group_of) < count_runs(best, group_of):
            best = order
    return best


def _chain_units(units, colours, group_of, start: int) -> list[int]:
    remaining = [u for u in range(len(units)) if u != start]
    order, tail, unit = [], None, start
    while True:
        shared = {c: sum(c in colours[w] for w in remaining) for c in colours[unit]}
        last = max(colours[unit] - {tail} or colours[unit], key=lambda c: (shared[c], -c))
        rank = {c: (0 if c == tail else 2 if c == last else 1, c) for c in colours[unit]}
        heads = sorted(units[unit], key=lambda h: (rank[group_of[h]], h))
        order += heads
        tail = group_of[heads[-1]]
        if not remaining:
            return order
        unit = max(remaining, key=lambda w: (tail in colours[w], len(colours[w]) == 1, -len(colours[w]), -w))
        remaining.remove(unit)


def _final_groups(groups: list[HeadGroup], order: list[int], gqa_split: str) -> tuple[list[HeadGroup], int]:
    """Groups in the new head numbering, and how many were split by GQA."""
    position = {old: new for new, old in enumerate(order)}
    result, split = [], 0
    for group in groups:
        runs = _runs(sorted(position[h] for h in group.heads))
        split += len(runs) > 1
        parts = runs if gqa_split == "subgroups" else [sum(runs, [])]
        result += [HeadGroup(group.pattern, group.params, part) for part in parts]
    return sorted(result, key=lambda g: g.heads[0]), split


# -- graph rewrites for the gather fallback and per-head masks ----------------------------------

def _index_heads(gm: torch.fx.GraphModule, tensor: torch.fx.Node, order: list[int], name: str,
                 anchor: torch.fx.Node, dim: int = 1) -> torch.fx.Node:
    """``index_select(tensor, dim, order)`` before ``anchor``, ``order`` a buffer ``name`` of ``gm``."""
    if not hasattr(gm, name):
        gm.register_buffer(name, torch.tensor(order, dtype=torch.long, device=tensor.meta["val"].device))
    with gm.graph.inserting_before(anchor):
        index = gm.graph.get_attr(name)
        index.meta["val"] = getattr(gm, name)
        selected = gm.graph.call_function(aten.index_select.default, (tensor, dim, index))
    selected.meta["val"] = tensor.meta["val"]
    return selected


def _mask_heads(gm, node, order: list[int]) -> None:
    mask = node.args[3]
    selected = _index_heads(gm, mask, order, f"_sparsec_{node.name}_mask_heads", node,
                            dim=mask.meta["val"].dim() - 3)
    node.update_arg(3, selected)


def _gather(gm: torch.fx.GraphModule, node: torch.fx.Node, order: list[int], kv_order: list[int]) -> None:
    q, k, v = node.args[:3]
    node.update_arg(0, _index_heads(gm, q, order, f"_sparsec_{node.name}_q_heads", node))
    if kv_order != sorted(kv_order):
        node.update_arg(1, _index_heads(gm, k, kv_order, f"_sparsec_{node.name}_kv_heads", node))
        node.update_arg(2, _index_heads(gm, v, kv_order, f"_sparsec_{node.name}_kv_heads", node))
    if mask_is_per_head(node.args[3]):
        _mask_heads(gm, node, order)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    users = list(node.users)
    restored = _index_heads(gm, node, inverse, f"_sparsec_{node.name}_output_heads", node.next)
    for user in users:
        user.replace_input_with(node, restored)


# -- the pass ----------------------------------------------------------------------------------

class FuseHeads:
    """See the module docstring.

    Args:
        merge_threshold: merge two groups into their covering pattern when the relative time
            the merge adds is at most this (0.0: only merges that the cost model says save
            time); ``None`` merges nothing beyond identical instances.
        max_groups_per_layer: merge (cheapest first) until a site has at most this many groups.
        length: the sequence length merge costs are evaluated at.
        fallback: ``"head_index"`` or ``"gather"``, where weights cannot be permuted.
        gqa_split: ``"head_index"`` or ``"subgroups"``, for groups GQA leaves non-contiguous.
    """

    name = "fuse_heads"

    def __init__(self, merge_threshold: float | None = None, max_groups_per_layer: int | None = None,
                 length: int = 4096, fallback: str = "head_index", gqa_split: str = "head_index"):
        if fallback not in ("head_index", "gather"):
            raise ValueError(f"fallback must be 'head_index' or 'gather', not {fallback!r}")
        if gqa_split not in ("subgroups", "head_index"):
            raise ValueError(f"gqa_split must be 'subgroups' or 'head_index', not {gqa_split!r}")
        self.merge_threshold = merge_threshold
        self.max_groups = max_groups_per_layer
        self.length = length
        self.fallback = fallback
        self.gqa_split = gqa_split

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        cost_model = CostModel(ctx.target)
        decisions, graph_changed = {}, False
        stats = {"launches_before": [], "launches_after": [], "heads_moved": 0, "groups_merged": 0,
                 "groups_split_by_gqa": 0, **{f"sites_{s}": 0 for s in STRATEGIES}}
        for site in ctx.plan.attention:
            node = nodes.get(site.node)
            if node is None or node.target != ATTENTION:
                continue
            record, changed = self._fuse_site(gm, node, site, cost_model)
            graph_changed |= changed
            decisions[site.name] = {**record.to_dict(), "groups": [vars(g) for g in site.groups]}
            stats["launches_before"].append(record.launches_before)
            stats["launches_after"].append(record.launches_after)
            stats[f"sites_{record.strategy}"] += 1
            stats["heads_moved"] += sum(p != h for h, p in enumerate(site.head_permutation()))
            stats["groups_merged"] += len(record.merges)
            stats["groups_split_by_gqa"] += record.groups_split_by_gqa
        modified = graph_changed or any(r["strategy"] == "weights" for r in decisions.values())
        return PassResult(gm, modified, stats, decisions)

    def _fuse_site(self, gm, node, site: AttentionSite, cost_model: CostModel) -> tuple[FuseRecord, bool]:
        """Group, order and permute one site; returns its record and whether the graph changed."""
        per_kv = site.num_heads // site.num_kv_heads
        sparse = any(not h.is_dense for h in site.heads)

        def cost(kind: str, params: dict, count: int) -> float:
            return cost_model.site_seconds([(kind, params, count)], self.length, site.effective_causal(), site.head_dim)

        groups, merges = merge_groups(site.instance_groups(), cost, self.merge_threshold, self.max_groups)
        self._record_merges(site, groups)
        group_of = [0] * site.num_heads
        for index, group in enumerate(groups):
            for h in group.heads:
                group_of[h] = index
        order = arrange_heads(group_of, per_kv)
        if count_runs(order, group_of) >= count_runs(list(range(site.num_heads)), group_of):
            order, strategy, reason, parameters = list(range(site.num_heads)), "none", "heads already in order", {}
        else:
            order, strategy, reason, parameters = self._realise(gm, node, site, order, per_kv)
        # With head-index metadata the groups keep their original, scattered heads.
        split_mode = "head_index" if strategy == "head_index" else self.gqa_split
        final, split = _final_groups(groups, order, split_mode)
        split = 0 if strategy == "head_index" else split
        site.heads = [replace(site.heads[old], head=new) for new, old in enumerate(order)]
        site.set_groups(final, "fuse_heads")
        site.fusion = FuseRecord(
            strategy=strategy, reason=reason, head_permutation=order,
            kv_head_permutation=[order[u * per_kv] // per_kv for u in range(site.num_kv_heads)],
            launches_before=site.num_heads if sparse else 1,     # unfused: one launch per head
            launches_after=len(final) if sparse else 1,
            groups_split_by_gqa=split, gqa_split=split_mode if split else None,
            permuted_parameters=parameters, merges=[vars(m) for m in merges])
        graph_changed = strategy == "gather" or (strategy == "weights" and mask_is_per_head(node.args[3]))
        return site.fusion, graph_changed

    def _realise(self, gm, node, site: AttentionSite, order: list[int], per_kv: int):
        """Put the heads in ``order`` by permuting weights, else by the fallback; returns
        the order in effect, the strategy, why, and the permuted parameters (name -> axis)."""
        kv_order = [order[u * per_kv] // per_kv for u in range(site.num_kv_heads)]
        try:
            moves = find_head_moves(gm, node)
            indices = parameter_indices(gm, moves.moves, {"q": order, "kv": kv_order})
        except NotPermutable as error:
            reason = f"weights not permuted: {error}"
            site.notes.append(f"fuse_heads: {reason}; using {self.fallback}")
            if self.fallback == "gather":
                _gather(gm, node, order, kv_order)
                return order, "gather", reason, {}
            return list(range(site.num_heads)), "head_index", reason, {}
        permute_parameters(gm, indices)
        if moves.mask_per_head:
            _mask_heads(gm, node, order)
        return order, "weights", "", {target: {"axis": axis, "index": index.tolist()}
                                      for target, (axis, index) in indices.items()}

    @staticmethod
    def _record_merges(site: AttentionSite, groups: list[HeadGroup]) -> None:
        """Merged heads take their group's covering pattern; their reason says so."""
        for group in groups:
            for h in group.heads:
                head = site.heads[h]
                reason = head.reason
                if instance_key(head.pattern, head.params) != instance_key(group.pattern, group.params):
                    reason += (f"{'; ' if head.reason else ''}fuse_heads: runs as {group.pattern} "
                               f"{group.params} (was {head.pattern} {head.params}) with heads {group.heads}")
                head.assign(group.pattern, group.params, reason)        # the group's canonical params
