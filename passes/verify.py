"""verify: measure the plan end to end and make heads denser until it is within tolerance.

The last decision of every compile (after classification or the search, before head
fusion). The canonical graph runs on the verification inputs twice: dense, and with every
sparse site computed by sparse attention (the reference every kernel is tested against; on
CPU the block-sparse path the compiled model runs there, equal to it up to rounding). The error of the whole model's output is measured with the
:class:`~sparsec.ir.tolerance.Tolerance` (KL and top-1 agreement for language models, relative
L2 otherwise). While it is over tolerance, heads are made denser one step each and the
model is measured again. A head's first step refits it to miss an eighth of the attention
mass it misses (classification's rule at that recall, within its own family or a dynamic
one, never a layout taken from the calibration text; where no fit reaches that recall, the
one that keeps the most while it still pays), its second makes it dense; a refit is counted
as removing half of the head's *measured* local error (``||sparse - dense||²`` of the
head's attention output at its site, relative to the site's mean head), a dense step all of
it. A round takes the steps that remove the most local error per attention FLOP they give
up at the longest verified length (a greedy knapsack), until they remove half of what every
step could (three quarters after a first measurement at twice the tolerance or more: the
same SmolLM2 plan in one round fewer; docs/benchmarks.md, "Which heads verification makes
dense", says why the share is not predicted further). Pricing a step by what it gives up,
not by all the head saves, matters: priced as a dense step each, the first round at 8k
stepped every sparse head of SmolLM2 and made 92 heads dense whose refit did not reach its
recall (docs/benchmarks.md, "Spread estimating queries, steps priced by what they give
up"). The sites a round changed are merged again (``merge_head_groups.merge_site``), so
refitted heads share launches where the cost model says so. Refits kept SmolLM2 at 8k at a
34 % cut of attention FLOPs with held-out top-1 0.981, where densifying alone gave 36 % at
0.975 (docs/benchmarks.md, "Refit before dense"); priced steps at 42 % (0.976 held out). With enforcement off (``tolerance=None``, a
speed or density budget) nothing is undone; an error above the tolerance is warned about.

In fp16 / bf16 two dense computations of one model already differ (a long random-weight
model: rel. L2 5e-2 between eager and torch.compile at 32k), and densifying cannot remove
that. So a low-precision model is also run once with its verified sites computed dense in
fp32 (rounded back to the model's dtype): that error is its *noise floor*, what a different
attention kernel alone changes, and the tolerance bounds what the plan adds above it (error
minus floor; top-1 agreement plus what the floor loses). Both are recorded.

``plan.verification`` (:class:`~sparsec.ir.plan.VerificationRecord`) records the metric, tolerance, measured error (and top-1
agreement), the input lengths it holds for, and every step that made a head denser, with why. The
plan holds for the lengths it was verified at; patterns are elastic in the length, so
longer inputs run, but their error is only measured if verification inputs that long are
given (``compile(verification=...)``).

Cost: nothing when every head is at its baseline; else one dense run per verification
batch (its values at the sparse sites are cached; calibrate's runs where verification is on
the calibration batches), then one suffix run per round from the
first sparse site, on the first batch alone until the plan holds there, then one per batch
to confirm it on all; rounds halve the remaining local error (as counted above), so there
are about ``log2(sparse heads)`` of them (6 for SmolLM2 verified at 8k).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import torch

from sparsec.analysis.cost_model import CostModel, head_flops
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.patterns import get_pattern
from sparsec.patterns.base import baseline_pattern
from sparsec.ir.plan import AttentionSite, HeadPlan, VerificationRecord
from sparsec.ir import reference
from sparsec.ir.tolerance import Tolerance, logits_of, top1_agreement

from sparsec.passes.helpers.attention_sites import ATTENTION
from sparsec.passes.classify_heads import candidate_families, classify_head, pays
from sparsec.passes.helpers.suffix_runs import SuffixRunner
from sparsec.passes.merge_head_groups import merge_site


class Verify:
    """See the module docstring. ``enforce=False`` measures and warns without densifying."""

    name = "verify"

    def __init__(self, tolerance: Tolerance, enforce: bool = True):
        self.tolerance, self.enforce = tolerance, enforce

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes if n.op == "call_function" and n.target == ATTENTION}
        # Only sites with a head sparser than its baseline can differ from the dense model.
        sites = {nodes[site.node]: site for site in ctx.plan.attention
                 if site.node in nodes and any(_reducible(site, head) for head in site.heads)}
        calls = ctx.verification or ctx.calibration
        record = VerificationRecord(**self.tolerance.to_dict(), enforced=self.enforce, batches=len(calls))
        runner = SuffixRunner(gm, list(sites)) if sites else None
        batches = runner.dense_runs(calls, None if ctx.verification else ctx.dense_runs) if runner else []
        ctx.dense_runs = None
        # Every round is measured against the same dense outputs: their side of the metric once.
        metrics = [self.tolerance.against(dense) for _, dense in batches]
        record.lengths = sorted({int(cache[node.args[1]].shape[-2]) for cache, _ in batches for node in sites}
                                or {n for stats in ctx.attention_stats.values() for n in stats.lengths})
        floor, floor_top1 = self._noise_floor(runner, batches, metrics, sites)
        record.noise_floor, record.noise_floor_top1 = floor, floor_top1
        if floor is not None and floor > self.tolerance.max_error:
            warnings.warn(f"sparsec: the model's own numerical noise floor in its dtype ({self.tolerance.metric_name} "
                          f"{floor:.3g} with every head dense) is above the tolerance {self.tolerance.max_error:g}: "
                          "a plan's error cannot be told from it at this precision; compile an fp32 copy to "
                          "verify it", stacklevel=2)
        # Densify rounds measure the first batch alone; a plan within tolerance there is then
        # measured on every batch (and rounds go on over all of them if that fails).
        active = 1 if self.enforce else len(batches)
        cost_model = CostModel(ctx.target)
        next_steps = _NextSteps()
        while True:
            error, top1, local = self._measure(runner, batches[:active], metrics[:active], sites)
            record.measured, record.top1_agreement = error, top1
            # The plan's own share: what the noise floor already loses is not its doing.
            above_floor = (max(0.0, error - (floor or 0.0)),
                           None if top1 is None else min(1.0, top1 + 1.0 - (floor_top1 or 1.0)))
            within = self.tolerance.holds(*above_floor)
            if within and active < len(batches):
                active = len(batches)
                continue
            if within or not self.enforce or not local:
                break
            record.rounds += 1
            by_name = {site.name: site for site in sites.values()}
            # A first measurement far over the tolerance (twice or more) loses three quarters of
            # what this round's steps could remove at once; every other round half.
            far = record.rounds == 1 and self.tolerance.excess(*above_floor) >= 2.0
            refitted = record.refitted            # refitted once: their next step is the baseline
            steps = {key: next_steps.get(by_name[key[0]], key[1], ctx, cost_model, key not in refitted)
                     for key in local}
            costs = _step_costs(by_name, steps, max(record.lengths))
            removal = {key: REFIT_REMOVES if step.refit else 1.0 for key, step in steps.items()}
            why = f"the model's {self.tolerance.metric_name} was {error:.3g} over tolerance {self.tolerance.describe()}"
            touched = set()
            for name, head in _worst(local, costs, 0.75 if far else 0.5, removal):
                site, step = by_name[name], steps[name, head]
                record.densified.append({"site": name, "head": head, "pattern": _head(site, head).pattern,
                                         "local_error": local[name, head], "model_error_before": error,
                                         "top1_before": top1, "refit": step.refit, "to": step.pattern})
                step.take(site, head, why)
                touched.add(name)
            # Refitted heads have parameters of their own: share launches again where it pays,
            # before the plan is measured again (merged masks only keep more).
            for name in touched:
                merge_site(by_name[name], cost_model, ctx.serving_length(name), ctx.attention_stats.get(name))
        record.within_tolerance = within
        ctx.plan.verification = record
        if not within:
            warnings.warn(_warning(record, self.tolerance, self.enforce), stacklevel=2)
        if sites and ctx.seq_len and max(record.lengths, default=0) < ctx.seq_len:
            # Costed for a length nothing was measured at: say so (a plan calibrated and
            # verified at 2k measured rel. L2 0.68 against dense at 32k on SmolLM2).
            record.unverified_at_seq_len = ctx.seq_len
            warnings.warn(f"sparsec: the plan is costed for seq_len={ctx.seq_len} but verified only at lengths "
                          f"{record.lengths}; its error there is unknown: pass verification inputs of that "
                          "length (compile(verification=...))", stacklevel=2)
        decisions = {"verification": record.to_dict()}
        stats = {"heads_densified": len(record.densified), "rounds": record.rounds}
        return PassResult(gm, False, stats, decisions)

    def _noise_floor(self, runner, batches, metrics, sites) -> tuple[float | None, float | None]:
        """(error, top-1 agreement) of the model with every verified site computed dense in
        fp32, for fp16 / bf16 models; ``(None, None)`` otherwise."""
        if not batches or not _low_precision(batches[0][1]):
            return None, None
        fp32 = {node: _fp32_attention for node in sites}
        errors, agreements = [], []
        for (cache, output), metric in zip(batches, metrics):
            noisy = runner.run_replaced(cache, fp32)
            errors.append(metric(noisy))
            if logits_of(output) is not None:
                agreements.append(top1_agreement(output, noisy))
        return sum(errors) / len(errors), (sum(agreements) / len(agreements) if agreements else None)

    def _measure(self, runner, batches, metrics, sites) -> tuple[float, float | None, dict]:
        """Mean model error, mean top-1 agreement (language models) and each sparse head's
        summed local error, with the plan as it is now."""
        overrides = {node: site.instance_groups() for node, site in sites.items()
                     if any(_reducible(site, h) for h in site.heads)}
        if not overrides:
            return 0.0, (1.0 if batches and logits_of(batches[0][1]) is not None else None), {}
        local: dict[tuple[str, int], float] = {}     # (site name, head) -> summed local error
        reducible = {node: [head.head for head in site.heads if _reducible(site, head)]
                     for node, site in sites.items()}
        indices: dict = {}        # node -> its reducible heads on the device, made once for every batch

        def observe(node, args, sparse_out):
            # Only the reducible heads are recomputed dense: every other head's sparse output is
            # its dense one, and the site's energy (the scale) is made of both.
            site, heads = sites[node], reducible[node]
            if node not in indices:
                indices[node] = torch.tensor(heads, device=sparse_out.device)
            index = indices[node]
            sparse_part = sparse_out.index_select(1, index).double()
            dense_part = reference.dense_heads(*args[:6], index).double()
            per_head = (sparse_part - dense_part).pow(2).sum((0, 2, 3))
            energy = sparse_out.double().pow(2).sum() - sparse_part.pow(2).sum() + dense_part.pow(2).sum()
            scale = energy / site.num_heads + 1e-30
            for position, head in enumerate(heads):
                key = site.name, head
                local[key] = local.get(key, 0.0) + float(per_head[position] / scale)

        errors, agreements = [], []
        for (cache, dense), metric in zip(batches, metrics):
            sparse = runner.run(cache, overrides, observe)
            errors.append(metric(sparse))
            if logits_of(dense) is not None:
                agreements.append(top1_agreement(dense, sparse))
        top1 = sum(agreements) / len(agreements) if agreements else None
        return sum(errors) / len(errors), top1, local


# The share of a head's local error a refit is counted to remove when a round chooses how
# many heads to step (made dense: all of it).
REFIT_REMOVES = 0.5


def _fp32_attention(node, args, kwargs) -> torch.Tensor:
    q, k, v, mask, scale, causal = args[:6]
    mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    # K / V repeated to every query head: fp32 GQA would fall back to SDPA's O(N^2) math kernel.
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    return reference.dense_attention(q.float(), k.float(), v.float(), mask, scale, causal).to(q.dtype)


def _low_precision(output) -> bool:
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]
    return any(leaf.dtype in (torch.float16, torch.bfloat16) for leaf in leaves)


def _step_costs(by_name: dict, steps: dict, n: int) -> dict:
    """The attention FLOPs each head's next step gives up at length ``n`` (at least a
    thousandth of its site's baseline, so that every ratio is finite)."""
    costs = {}
    for (name, head), step in steps.items():
        site = by_name[name]
        causal, plan = site.effective_causal(), _head(site, head)
        baseline = head_flops(*baseline_pattern(site), n, causal, site.head_dim)
        now = head_flops(plan.pattern, plan.params, n, causal, site.head_dim)
        after = head_flops(step.pattern, step.params, n, causal, site.head_dim)
        costs[name, head] = max(after - now, 1e-3 * baseline)
    return costs


def _worst(local: dict, costs: dict, share: float = 0.5, removal: dict | None = None) -> list:
    """The heads whose steps remove ``share`` of the local error this round's steps could
    remove, by removed error per FLOP given up, highest first (at least one); a step removes
    ``removal[head]`` of its head's error (default all of it: made dense)."""
    removed = {key: local[key] * (1.0 if removal is None else removal[key]) for key in local}
    ranked = sorted(local, key=lambda key: (-removed[key] / costs[key], key))
    total, chosen, covered = sum(removed.values()), [], 0.0
    for key in ranked:
        chosen.append(key)
        covered += removed[key]
        if covered >= share * total:
            break
    return chosen


def _reducible(site: AttentionSite, head) -> bool:
    """Whether verification could make ``head`` denser: it is sparser than the site's baseline."""
    return (head.pattern, head.params) != baseline_pattern(site)


def _head(site: AttentionSite, head: int):
    return next(plan for plan in site.heads if plan.head == head)


@dataclass
class _Step:
    """A head's next step: a refit (``refit``) or the site's baseline."""

    pattern: str
    params: dict
    recall: float
    density: float
    refit: bool
    reason: str

    def take(self, site: AttentionSite, head: int, why: str) -> None:
        plan = _head(site, head)
        plan.assign(self.pattern, self.params, f"{self.reason}, {why}")
        plan.recall, plan.density = self.recall, self.density
        site.regroup()


class _NextSteps:
    """:func:`_next_step` of each head, kept while the head's plan is unchanged (a round
    prices every head's step; most heads are not stepped, and a refit fits every family)."""

    def __init__(self):
        self._steps: dict = {}

    def get(self, site: AttentionSite, head: int, ctx: CompileContext, cost_model: CostModel,
            may_refit: bool) -> _Step:
        plan = _head(site, head)
        key = (site.name, head, plan.pattern, json.dumps(plan.params, sort_keys=True), plan.recall, may_refit)
        if key not in self._steps:
            self._steps[key] = _next_step(site, head, ctx, cost_model, may_refit)
        return self._steps[key]


def _next_step(site: AttentionSite, head: int, ctx: CompileContext, cost_model: CostModel,
               may_refit: bool = True) -> _Step:
    """``head`` refitted to miss an eighth of the attention mass it misses now (its own family,
    or a dynamic one), when ``may_refit`` and that is another pattern still sparse enough to
    pay (classification's rule); where no such fit reaches that recall, the fit that keeps
    the most mass above the head's own recall while it pays; else the site's baseline."""
    plan, stats = _head(site, head), ctx.attention_stats.get(site.name)
    if may_refit and stats is not None and stats.profiles and plan.recall is not None and plan.recall < 1:
        recall = 1 - (1 - plan.recall) / 8
        # Its own family or one estimated per input, never a layout taken from the calibration
        # text: refitted to keep more of it, a block_topk head held rel. L2 1.5e-2 at the
        # calibration length and gave 0.46 at 1.5x it (examples/compile_llama.py).
        families = candidate_families(ctx, stats.causal)
        sparse = [kind for kind in families if not get_pattern(kind).computes_all
                  and (kind == plan.pattern or get_pattern(kind).dynamic)
                  and not get_pattern(kind).layout_from_calibration]
        refit = HeadPlan(head)
        if sparse:
            dense = [kind for kind in families if get_pattern(kind).computes_all]
            classify_head(refit, stats.head(head), stats.causal, site.head_dim, recall, float(ctx.min_saving),
                          cost_model, (*dense, *sparse), ctx.seq_len)
        if not refit.is_dense and (refit.pattern, refit.params) != (plan.pattern, plan.params):
            return _Step(refit.pattern, refit.params, refit.recall, refit.density, True,
                         f"verify: refitted at recall {recall:.4g}")
        if refit.is_dense and refit.candidates:
            # No fit reaches that recall (vertical_slash fits at most an eighth of the keys as
            # lines): the one that keeps the most, where it keeps more than now and still pays.
            dense_seconds = next(c["seconds"] for c in refit.candidates if get_pattern(c["pattern"]).computes_all)
            paying = [c for c in refit.candidates if not get_pattern(c["pattern"]).computes_all
                      and pays(c, dense_seconds, float(ctx.min_saving)) and c["recall"] > plan.recall]
            best = max(paying, key=lambda c: (c["recall"], -c["seconds"]), default=None)
            if best is not None:
                return _Step(best["pattern"], best["params"], best["recall"], best["density"], True,
                             f"verify: refitted at recall {best['recall']:.4g}, the most its family keeps "
                             f"({recall:.4g} asked)")
    return _Step(*baseline_pattern(site), 1.0, 1.0, False, "verify: made dense")


def _warning(record: VerificationRecord, tolerance: Tolerance, enforced: bool) -> str:
    top1 = "" if record.top1_agreement is None else f", top-1 agreement {record.top1_agreement:.3f}"
    why = ("even with every head dense" if enforced else
           "and was left so (enforcement is off for tolerance=None, a speed or density budget and a given "
           "plan): densify heads, raise recall, or use Budget(max_error=...)")
    return (f"sparsec: the compiled model's measured {tolerance.metric_name} is {record.measured:.3g}{top1} "
            f"on {record.batches} verification batch(es) at lengths {record.lengths}, over the tolerance "
            f"{tolerance.describe()} {why}")
