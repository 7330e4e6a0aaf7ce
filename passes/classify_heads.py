"""classify_heads: per head, the cheapest pattern that keeps enough attention mass.

For every head of every site, each pattern family fits its parameters to the head's
calibration profiles (``ctx.attention_stats``, from ``calibrate``) and reports its recall,
the fraction of attention mass its mask keeps (lowest over the calibration lengths). The
head takes the fastest candidate — by the target's cost model (:class:`sparsec.analysis.cost_model.CostModel`:
exact pair counts at the dense or the sparse kernels' measured rate) at the longest
calibration length — whose recall reaches ``ctx.recall`` (default 0.95); ties
go to the simpler family, in registration order (:func:`~sparsec.patterns.pattern_kinds`). Otherwise it stays dense, and
``reason`` says why. Every candidate is recorded in ``HeadPlan.candidates``.

- ``skip`` keeps no mass (recall 0), so a recall threshold never selects it; it is
  recorded for completeness and left to budget-driven search.
- Dynamic families (``vertical_slash``, ``dynamic_blocks``) are allowed: their recall and
  cost are estimates (the mask is chosen per input) and their cost includes the estimation.
  They are taken only where no static pattern reaches the recall and pays: at the serving
  length their estimates keep less than at calibration (see :func:`classify_head`).
- A sparse pattern must also save at least ``ctx.min_saving`` (default 0.2)
  of the dense head's predicted time. Ranking by time rather than FLOPs matters: sparse
  kernels run at about 70% of dense SDPA's rate on an H100, so a 70%-dense block layout
  is no faster than dense (seen in the 32k end-to-end benchmark, docs/benchmarks.md).
- Heads whose user mask is exactly causal are classified as causal (see ``calibrate``).
- At a causal site a family whose layout is taken from the calibration text (``block_topk``)
  is a candidate only where the user names it (``patterns=``): see :func:`candidate_families`.
- At a site whose in-graph sliding-window mask ``fold_causal_mask`` replaced by
  ``causal=True`` (``extra["model_window"]``), every head keeps the model's window
  (:func:`~sparsec.patterns.base.baseline_pattern`): the site is already lowered to it,
  and any other pattern would attend outside the window or need a second lowering. Its
  recall and density are recorded; ``reason`` says why it is fixed.
"""
from __future__ import annotations

from collections import Counter

import torch

from sparsec.analysis.cost_model import CostModel, head_flops
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.patterns import get_pattern, pattern_kinds
from sparsec.patterns.base import MODEL_WINDOW, baseline_pattern
from sparsec.patterns.fitting import worst_recall
from sparsec.ir.plan import AttentionSite, HeadPlan



def classify_head(head: HeadPlan, profiles: list, causal: bool, head_dim: int, recall: float,
                  min_saving: float, cost_model: CostModel, families: tuple[str, ...] | None = None,
                  seq_len: int | None = None) -> None:
    """Fit every family (default: every registered one that has a fit) to one head's
    profiles and write the choice into ``head``; costs at ``seq_len`` (the serving length),
    default the longest calibration length."""
    length = seq_len or profiles[-1].n_k
    candidates = []
    for kind in families or pattern_kinds():
        pattern = get_pattern(kind)
        try:
            params, reached = pattern.fit(profiles, recall)
        except NotImplementedError:         # a family without a fit is never a candidate
            continue
        candidates.append({
            "pattern": kind, "params": params, "recall": round(float(reached), 6),
            "density": round(float(pattern.density(params, length, causal)), 6),
            "cost": head_flops(kind, params, length, causal, head_dim),
            "seconds": cost_model.head_seconds(kind, params, length, causal, head_dim),
        })
    baseline = next(c for c in candidates if get_pattern(c["pattern"]).computes_all)
    dense_seconds = baseline["seconds"]
    meeting = [c for c in candidates if c["recall"] >= recall and c is not baseline]
    # A static pattern that pays goes first: a dynamic family's recall is an estimate of its
    # per-input estimate, and at the serving length it keeps less (SmolLM2 at 8k, calibrated
    # at 2k: verification made most vertical_slash heads dense, a 32.0 % cut at top-1 0.982,
    # where the same heads as sink_window / vertical_stripe held: 41.0 % at 0.984).
    static = [c for c in meeting if not get_pattern(c["pattern"]).dynamic and pays(c, dense_seconds, min_saving)]
    cheapest = min(static or meeting, key=lambda c: c["seconds"], default=None)      # min keeps the first tie
    if cheapest is not None and pays(cheapest, dense_seconds, min_saving):
        which = "static pattern" if static else "pattern (no static one pays)"
        chosen, reason = cheapest, f"fastest {which} with recall >= {recall} on {cost_model.target.name}"
    else:
        chosen = baseline
        if cheapest is None:
            best = max((c for c in candidates if c is not baseline), key=lambda c: c["recall"])
            reason = (f"no sparse pattern reaches recall {recall}: best is {best['pattern']} "
                      f"at {best['recall']:.3f}")
        else:
            reason = (f"fastest pattern with recall >= {recall} ({cheapest['pattern']}, density "
                      f"{cheapest['density']:.3f}) saves less than {min_saving:.0%} of dense time "
                      f"on {cost_model.target.name}")
    head.assign(chosen["pattern"], chosen["params"], reason)
    head.recall, head.density = chosen["recall"], chosen["density"]
    head.candidates = candidates


def pays(candidate: dict, dense_seconds: float, min_saving: float) -> bool:
    """Whether a sparse candidate saves at least ``min_saving`` of the dense head's time."""
    return candidate["seconds"] <= (1 - min_saving) * dense_seconds


def candidate_families(ctx: CompileContext, causal: bool = False) -> tuple[str, ...]:
    """The families a head may take: the user's ``patterns``, always with the dense baseline
    first. By default every registered one, except at a ``causal`` site those whose layout is
    taken from the calibration text (``block_topk``): in a causal LM which keys matter at a
    position is the content's, so the layout holds for the calibration text alone (the README
    example's block_topk head: rel. L2 3.2e-2 at the verified 2048 tokens, 0.137 at 3000)."""
    baseline = [kind for kind in pattern_kinds() if get_pattern(kind).computes_all]
    default = [kind for kind in pattern_kinds() if not (causal and get_pattern(kind).layout_from_calibration)]
    return (*baseline, *(kind for kind in ctx.patterns or default if kind not in baseline))


class ClassifyHeads:
    """Choose each head's pattern from ``ctx.attention_stats``; see the module docstring."""

    name = "classify_heads"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        recall, min_saving = float(ctx.recall), float(ctx.min_saving)
        ctx.plan.recall_threshold = recall
        kinds: Counter = Counter()
        cost_model = CostModel(ctx.target)
        for site in ctx.plan.attention:
            self._classify_site(site, ctx, recall, min_saving, cost_model)
            kinds.update(head.pattern for head in site.heads)
        heads = sum(kinds.values())
        stats = {"heads_classified": heads, "sparse_heads": heads - kinds["dense"], **dict(sorted(kinds.items()))}
        decisions = {site.name: [{"head": h.head, "pattern": h.pattern, "params": h.params,
                                  "recall": h.recall, "density": h.density, "reason": h.reason}
                                 for h in site.heads] for site in ctx.plan.attention}
        return PassResult(gm, False, stats, decisions)

    @staticmethod
    def _classify_site(site: AttentionSite, ctx: CompileContext, recall: float, min_saving: float,
                       cost_model: CostModel) -> None:
        stats = ctx.attention_stats.get(site.name)
        if MODEL_WINDOW in site.extra:
            _keep_model_window(site, stats)
            return
        if stats is None or not stats.profiles:
            for head in site.heads:
                head.assign("dense", {}, "no calibration statistics for this site")
            site.regroup()
            return
        families = candidate_families(ctx, stats.causal)
        for head in site.heads:
            classify_head(head, stats.head(head.head), stats.causal, site.head_dim, recall, min_saving,
                          cost_model, families, ctx.seq_len)
        site.regroup()


def _keep_model_window(site: AttentionSite, stats) -> None:
    """Every head of a site lowered to the model's own window keeps it (see the docstring)."""
    kind, params = baseline_pattern(site)
    pattern = get_pattern(kind)
    width = site.extra[MODEL_WINDOW]
    for head in site.heads:
        head.assign(kind, params, f"the model's own sliding window ({width} keys), fixed: its mask was replaced by "
                                  f"causal=True, so a denser pattern would attend outside it")
        if stats is not None and stats.profiles:
            profiles = stats.head(head.head)
            head.recall = round(float(worst_recall(pattern, profiles, params)), 6)
            head.density = round(float(pattern.density(params, profiles[-1].n_k, True)), 6)
        head.candidates = [{"pattern": kind, "params": dict(params), "recall": head.recall, "density": head.density}]
    site.regroup()
