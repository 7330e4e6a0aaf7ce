"""Group an attention site's heads by pattern instance; optionally merge groups into a
covering pattern when the target cost model says the saved launch is worth the added pairs.

Two heads share an *instance* when their masks are equal at every length: same kind, and
parameters equal after canonicalisation (numbers normalised, a length-independent
``Elastic`` size rounded to whole tokens as :meth:`Elastic.at` does, index lists sorted).
Merging (Sparse-vDiT's per-layer fusion of heads with one strategy) runs each head with a
pattern whose mask contains its own — recall can only rise. Groups are nodes of a
compatibility graph whose edges carry the relative time a merge adds (from the target cost
model: a launch saved against the pairs added); the cheapest edges are contracted first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import networkx as nx

from sparsec.patterns import canonical_params, get_pattern, instance_key, pattern_kinds
from sparsec.ir.plan import HeadGroup

# The time of one group: (pattern kind, params, number of heads) -> seconds.
GroupCost = Callable[[str, dict, int], float]


# -- covering patterns ------------------------------------------------------------------------

def covering(kind_a: str, params_a: dict, kind_b: str, params_b: dict) -> tuple[str, dict]:
    """The cheapest pattern sparsec knows whose mask contains both masks (``dense`` at worst):
    the same instance, the family's own union (:meth:`Pattern.merge`), or a family's rule for
    holding another's (:meth:`Pattern.cover`, either way round)."""
    if instance_key(kind_a, params_a) == instance_key(kind_b, params_b):
        return kind_a, canonical_params(kind_a, params_a)
    for (ka, pa), (kb, pb) in (((kind_a, params_a), (kind_b, params_b)), ((kind_b, params_b), (kind_a, params_a))):
        cover = _cover_ordered(ka, pa, kb, pb)
        if cover is not None:
            return ka, canonical_params(ka, cover)
    return _everything(), {}


def _everything() -> str:
    """The family that computes every pair (``dense``)."""
    return next(kind for kind in pattern_kinds() if get_pattern(kind).computes_all)


def _cover_ordered(ka: str, pa: dict, kb: str, pb: dict) -> dict | None:
    """Parameters of family ``ka`` holding both masks, or None."""
    if get_pattern(kb).computes_none:
        return pa
    if ka == kb:
        return get_pattern(ka).merge(pa, pb)
    return get_pattern(ka).cover(pa, kb, pb)


# -- merging -------------------------------------------------------------------------------------

@dataclass
class Merge:
    """A record of one contraction, for the plan and the dump."""

    pattern: str
    params: dict
    heads: list[int]
    added_cost: float       # relative to the two groups' time before


def merge_groups(groups: list[HeadGroup], cost: GroupCost, threshold: float | None,
                 max_groups: int | None) -> tuple[list[HeadGroup], list[Merge]]:
    """Contract the compatibility graph of ``groups`` (an edge's weight: the relative time a
    merge adds, negative when the saved launch outweighs the added tiles) while the
    cheapest edge is at most ``threshold``, or while there are more than ``max_groups``."""
    if threshold is None and max_groups is None:
        return groups, []
    graph = nx.Graph()
    for index, group in enumerate(groups):
        graph.add_node(index, group=group)
    for u in graph.nodes:
        for v in graph.nodes:
            if u < v:
                _add_edge(graph, u, v, cost)
    merges = []
    while graph.number_of_edges():
        u, v, edge = min(graph.edges(data=True), key=lambda e: (e[2]["added"], e[0], e[1]))
        over = max_groups is not None and graph.number_of_nodes() > max_groups
        if not over and (threshold is None or edge["added"] > threshold):
            break
        kind, params = edge["cover"]
        heads = sorted(graph.nodes[u]["group"].heads + graph.nodes[v]["group"].heads)
        nx.contracted_nodes(graph, u, v, self_loops=False, copy=False)
        graph.nodes[u]["group"] = HeadGroup(kind, params, heads)
        graph.nodes[u].pop("contraction", None)
        merges.append(Merge(kind, params, heads, edge["added"]))
        for w in list(graph.neighbors(u)):
            _add_edge(graph, u, w, cost)
    merged = sorted((graph.nodes[n]["group"] for n in graph.nodes), key=lambda g: g.heads[0])
    return merged, merges


def _add_edge(graph: nx.Graph, u: int, v: int, cost: GroupCost) -> None:
    a, b = graph.nodes[u]["group"], graph.nodes[v]["group"]
    kind, params = covering(a.pattern, a.params, b.pattern, b.params)
    before = cost(a.pattern, a.params, len(a.heads)) + cost(b.pattern, b.params, len(b.heads))
    after = cost(kind, params, len(a.heads) + len(b.heads))
    graph.add_edge(u, v, cover=(kind, params), added=(after - before) / before)
