"""The search's ladder: per head and recall target, the cheapest fitted pattern faster than dense.

A :class:`Rung` is one candidate of one head (a pattern instance, its recall and predicted
time at the serving length); level ``l`` of a layer puts every head at its rung ``l``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from sparsec.analysis.cost_model import CostModel
from sparsec.passes.infra.pass_manager import CompileContext
from sparsec.passes.classify_heads import candidate_families
from sparsec.patterns import get_pattern, instance_key
from sparsec.ir.plan import AttentionSite, HeadGroup, RunsPattern


@dataclass(frozen=True)
class Rung(RunsPattern):
    """One candidate of one head: a pattern instance and what it is predicted to cost."""

    pattern: str
    params: dict
    target: float                 # recall target it was fitted for (1.0: dense)
    recall: float | None          # recall on the calibration statistics, when known
    density: float                # fraction of the (causal) score matrix at seq_len
    seconds: float                # one head of one sequence at seq_len, launch excluded
    crossover: int | None = None  # shortest length from which it beats dense

    @property
    def key(self) -> str:
        """Equal keys mean one head group (:func:`sparsec.patterns.instance_key`)."""
        return instance_key(self.pattern, self.params)

    def to_dict(self) -> dict:
        return asdict(self)


# A ladder: per head, one rung per recall level (None: dense at that level).
Ladder = list[list["Rung | None"]]
LadderBuilder = Callable[[AttentionSite, CompileContext, tuple, CostModel, int], Ladder]


def dense_rung(site: AttentionSite, cost: CostModel, n: int) -> Rung:
    return Rung("dense", {}, 1.0, 1.0, 1.0, cost.head_seconds("dense", {}, n, site.effective_causal(), site.head_dim))


def fit_ladder(site: AttentionSite, ctx: CompileContext, levels: tuple, cost: CostModel, n: int) -> Ladder:
    """Per head and recall target, the cheapest fitted pattern faster than dense at ``n``."""
    stats = ctx.attention_stats.get(site.name)
    if stats is None:
        return [[None] * len(levels) for _ in site.heads]
    dense_seconds = dense_rung(site, cost, n).seconds
    causal = site.effective_causal()
    kinds = [kind for kind in candidate_families(ctx, causal)
             if not (get_pattern(kind).computes_all or get_pattern(kind).computes_none)]
    ladder = []
    for head in range(site.num_heads):
        profiles = stats.head(head)
        rungs = []
        for target in levels:
            best = None                      # (seconds, kind, params, recall)
            for kind in kinds:
                try:
                    params, recall = get_pattern(kind).fit(profiles, target)
                except NotImplementedError:
                    continue
                seconds = cost.head_seconds(kind, params, n, causal, site.head_dim)
                if recall >= target - 1e-9 and seconds < dense_seconds and (best is None or seconds < best[0]):
                    best = (seconds, kind, params, recall)
            if best is None:
                rungs.append(None)
                continue
            seconds, kind, params, recall = best
            rungs.append(Rung(kind, params, target, recall, get_pattern(kind).density(params, n, causal),
                              seconds, cost.crossover_length(kind, params, causal, site.head_dim)))
        ladder.append(rungs)
    return ladder


def rung_groups(rungs) -> list[HeadGroup]:
    groups: dict[str, HeadGroup] = {}
    for head, rung in enumerate(rungs):
        groups.setdefault(rung.key, HeadGroup(rung.pattern, rung.params, [])).heads.append(head)
    return list(groups.values())


def limit_patterns(rungs: list[Rung], dense: Rung, limit: int | None) -> list[Rung]:
    """At most ``limit`` distinct instances: keep the ones most heads share, the rest dense."""
    keys = {rung.key for rung in rungs}
    if limit is None or len(keys) <= limit:
        return rungs
    shares = sorted(keys - {dense.key}, key=lambda k: (-sum(r.key == k for r in rungs), k))
    kept = set(shares[:limit - 1])
    return [rung if rung.key in kept else dense for rung in rungs]
