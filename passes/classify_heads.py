"""classify_heads: per head, the cheapest pattern that keeps enough attention mass.

For every head of every site, each pattern family fits its parameters to the head's
calibration profiles (``ctx.attention_stats``, from ``calibrate``) and reports its recall,
the fraction of attention mass its mask keeps (lowest over the calibration lengths). The
head takes the cheapest candidate, by FLOPs (:meth:`Pattern.cost`, exact pair counts) at
the longest calibration length, whose recall reaches ``ctx.options["recall"]`` (default 0.95); ties
go to the simpler family, in :data:`FAMILIES` order. Otherwise it stays dense, and
``reason`` says why. Every candidate is recorded in ``HeadPlan.candidates``.

- ``skip`` keeps no mass (recall 0), so a recall threshold never selects it; it is
  recorded for completeness and left to budget-driven search.
- ``vertical_slash`` is allowed: its recall and cost are estimates (it is chosen per
  input), and its cost includes the estimation, so it wins only where no static pattern
  does at a lower cost.
- A sparse pattern must also save at least ``ctx.options["min_saving"]`` (default 0.2)
  of the dense cost: below that, block-sparse kernels' indexing overhead eats the gain.
- Heads whose user mask is exactly causal are classified as causal (see ``calibrate``).
"""
from __future__ import annotations

from collections import Counter

import torch

from sparsec.pass_manager import CompileContext, PassResult
from sparsec.patterns import get_pattern
from sparsec.plan import AttentionSite, HeadPlan

# Candidate families, simplest first (the tie-break).
FAMILIES = ("dense", "window", "sink_window", "vertical_stripe", "multi_diagonal", "block_topk",
            "vertical_slash", "skip")
DEFAULT_RECALL = 0.95
DEFAULT_MIN_SAVING = 0.2


def classify_head(head: HeadPlan, profiles: list, causal: bool, head_dim: int, recall: float,
                  min_saving: float, families: tuple[str, ...] = FAMILIES) -> None:
    """Fit every family to one head's profiles and write the choice into ``head``."""
    length = profiles[-1].n_k
    candidates = []
    for kind in families:
        pattern = get_pattern(kind)
        params, reached = pattern.fit(profiles, recall)
        candidates.append({
            "pattern": kind, "params": params, "recall": round(float(reached), 6),
            "density": round(float(pattern.density(params, length, causal)), 6),
            "cost": pattern.cost(params, length, causal, head_dim),
        })
    dense_cost = next(c["cost"] for c in candidates if c["pattern"] == "dense")
    meeting = [c for c in candidates if c["recall"] >= recall and c["pattern"] != "dense"]
    cheapest = min(meeting, key=lambda c: c["cost"], default=None)      # min keeps the first tie
    if cheapest is not None and cheapest["cost"] <= (1 - min_saving) * dense_cost:
        chosen, reason = cheapest, f"cheapest pattern with recall >= {recall}"
    else:
        chosen = next(c for c in candidates if c["pattern"] == "dense")
        if cheapest is None:
            best = max((c for c in candidates if c["pattern"] != "dense"), key=lambda c: c["recall"])
            reason = (f"no sparse pattern reaches recall {recall}: best is {best['pattern']} "
                      f"at {best['recall']:.3f}")
        else:
            reason = (f"cheapest pattern with recall >= {recall} ({cheapest['pattern']}, density "
                      f"{cheapest['density']:.3f}) saves less than {min_saving:.0%} of dense")
    head.pattern, head.params = chosen["pattern"], chosen["params"]
    head.recall, head.density = chosen["recall"], chosen["density"]
    head.candidates, head.reason = candidates, reason


class ClassifyHeads:
    """Choose each head's pattern from ``ctx.attention_stats``; see the module docstring."""

    name = "classify_heads"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        recall = float(ctx.options.get("recall", DEFAULT_RECALL))
        min_saving = float(ctx.options.get("min_saving", DEFAULT_MIN_SAVING))
        families = tuple(ctx.options.get("patterns", FAMILIES))
        if "dense" not in families:
            families = ("dense", *families)
        ctx.plan.recall_threshold = recall
        kinds: Counter = Counter()
        for site in ctx.plan.attention:
            self._classify_site(site, ctx, recall, min_saving, families)
            kinds.update(head.pattern for head in site.heads)
        heads = sum(kinds.values())
        stats = {"heads_classified": heads, "sparse_heads": heads - kinds["dense"], **dict(sorted(kinds.items()))}
        decisions = {site.name: [{"head": h.head, "pattern": h.pattern, "params": h.params,
                                  "recall": h.recall, "density": h.density, "reason": h.reason}
                                 for h in site.heads] for site in ctx.plan.attention}
        return PassResult(gm, False, stats, decisions)

    @staticmethod
    def _classify_site(site: AttentionSite, ctx: CompileContext, recall: float, min_saving: float,
                       families: tuple[str, ...]) -> None:
        stats = ctx.attention_stats.get(site.name)
        if stats is None or not stats.profiles:
            for head in site.heads:
                head.pattern, head.params, head.reason = "dense", {}, "no calibration statistics for this site"
            site.groups = site.group_heads_by_pattern()
            return
        for head in site.heads:
            classify_head(head, stats.head(head.head), stats.causal, site.head_dim, recall, min_saving, families)
        site.groups = site.group_heads_by_pattern()
