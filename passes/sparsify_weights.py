"""sparsify_weights: prune linear weights and rewrite them to ``sparsec.sparse_linear``.

Linears are ``aten.linear`` nodes whose weight is a ``get_attr`` parameter used by no
other node (``nn.Linear`` and Hugging Face linears capture this way). For each one:

1. analyse (:mod:`sparsec.analysis.linear_sensitivity`, recorded once per compile in
   ``ctx.linear_analysis``: by the search when it prices linears, else here): the linear's
   input statistics on the calibration batches (Wanda's ``||X_j||^2`` and a sample of rows),
   its scores (``wanda`` or ``magnitude``), and candidates: for every level the structure
   allows, the relative L2 change of the linear's output on the sampled rows (the layer's
   *sensitivity*) and the FLOPs per token left;
3. allocate levels for the global target: OWL (more outliers, less pruning) for
   unstructured and block structures, uniform for N:M; or levels given by a search
   (``ctx.weight_levels``);
4. rewrite: the dense weight is replaced by its compressed form (kept values + bit mask,
   :mod:`sparsec.weights.storage`) registered as buffers, and the node by
   ``sparse_linear(x, values, mask, bias, layout)``, so a saved program shrinks.

Configuration: ``ctx.weights`` (:class:`sparsec.WeightSparsity`: structure, sparsity, score,
exclude and the tuning knobs; the pass does nothing without a sparsity or levels),
``ctx.weight_levels`` / ``ctx.weight_levels_by`` (each linear's level, given or chosen by
the search) and ``ctx.weight_calibration_batches`` (see :class:`~sparsec.passes.infra.pass_manager.CompileContext`).

Each linear's plan entry (``ctx.plan.linears``, :class:`~sparsec.ir.plan.LinearPlan`) records structure, level, score,
``candidates`` [{level, error, cost[, model_error]}] for a budgeted search (``error``: the
relative L2 change of this linear's output on calibration activations; ``cost``: FLOPs per
token left), the local error at the chosen level, the measured contribution to the model's
output error, storage bytes and how the target will run it (``lowering``); an entry the
search decided also keeps its ``search`` record when the linears are analysed again here
(when fusing heads changed the graph; weights it only permuted are followed, not analysed again).
``ctx.plan.weights`` (:class:`~sparsec.ir.plan.WeightsRecord`) sums up: global sparsity, predicted and measured output
error on the calibration batches, dense and compressed bytes.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.fx

from sparsec.analysis.graph_runner import GraphRunner
from sparsec.analysis.linear_sensitivity import (LinearAnalysis, find_linears, get_tensor, output_error,
                                                 weight_is_shared)
from sparsec.passes.infra.pass_manager import CompileContext, PassResult
from sparsec.ir.plan import LinearPlan, WeightsRecord
from sparsec.analysis.linear_costs import plan_lowering
from sparsec.weights import COMPARISON_GROUP, Layout, compress, owl_levels, parse_structure, storage_bytes, uniform_levels
from sparsec.weights.config import WeightSparsity

from sparsec.passes.helpers.attention_sites import module_path

SPARSE_LINEAR = torch.ops.sparsec.sparse_linear.default


def _options(ctx: CompileContext) -> dict:
    weights = ctx.weights or WeightSparsity(sparsity=0.0)
    return {
        "sparsity": weights.sparsity,
        "structure": parse_structure(weights.structure),
        "score": weights.score,
        "allocation": weights.allocation,
        "lam": weights.owl_lambda,
        "threshold": weights.owl_threshold,
        "exclude": weights.exclude,
        "levels": dict(ctx.weight_levels or {}),
        "levels_by": ctx.weight_levels_by,
        "rows": weights.calibration_rows,
        "measure_each": weights.measure_each,
        "model_error": weights.candidate_model_error,
    }


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name, "*." + p) for p in patterns)


def _batches(ctx: CompileContext) -> list[tuple[tuple, dict]]:
    calls = list(ctx.calibration) or [(tuple(ctx.example_args), dict(ctx.example_kwargs or {}))]
    count = ctx.weight_calibration_batches
    return calls[:count] if count else calls


def analyze_linears(gm: torch.fx.GraphModule, ctx: CompileContext) -> LinearAnalysis:
    """Calibrate, score and measure every eligible linear on the first
    ``ctx.weight_calibration_batches`` calibration batches; writes ``ctx.plan.linears`` (one
    entry per linear, with why an ineligible one stays dense) and ``ctx.linear_analysis``."""
    opts = _options(ctx)
    structure = opts["structure"]
    entries, eligible = [], []
    for node in find_linears(gm):
        param = get_tensor(gm, node.args[1].target)
        out_features, in_features = param.shape
        entry = LinearPlan(name=module_path(node), node=node.name, weight=node.args[1].target,
                           in_features=int(in_features), out_features=int(out_features),
                           structure=str(structure), score=opts["score"],
                           comparison=COMPARISON_GROUP.get(opts["score"]))
        if _excluded(entry.name, opts["exclude"]):
            entry.reason = f"excluded (matches one of {list(opts['exclude'])})"
        elif weight_is_shared(gm, node):
            entry.reason = "weight is shared with another node (tied); left dense"
        elif not param.is_floating_point():
            entry.reason = f"weight dtype {param.dtype} is not floating point"
        elif misfit := structure.misfit(out_features, in_features):
            entry.reason = f"{structure} does not fit: {misfit}"
        else:
            eligible.append(node)
        entries.append(entry)
    analysis = LinearAnalysis(gm, eligible, _batches(ctx), structure, opts["score"], opts["rows"])
    for entry in entries:
        if entry.eligible:
            entry.outlier_ratio = analysis.outlier_ratio(entry.node, opts["threshold"])
            entry.candidates = analysis.candidates(entry.node, opts["model_error"])
    # What the search recorded stays with its linear when the rewrite analyses again.
    searched = {e.name: e.search for e in ctx.plan.linears}
    for entry in entries:
        entry.search = searched.get(entry.name)
    ctx.plan.linears = entries
    ctx.linear_analysis = analysis
    return analysis


def allocate(entries: list[LinearPlan], opts: dict) -> None:
    """Set ``level`` of every eligible entry: given levels, else OWL or uniform for ``sparsity``."""
    eligible = [e for e in entries if e.eligible]
    structure = opts["structure"]
    if opts["levels"]:
        for entry in eligible:
            entry.level = structure.nearest_level(float(opts["levels"].get(entry.name, 0.0)))
            entry.allocated_by = opts["levels_by"]
        return
    target = float(opts["sparsity"])
    method = opts["allocation"] or ("uniform" if structure.discrete else "owl")
    if method == "owl":
        levels = owl_levels([e.outlier_ratio for e in eligible],
                            [e.in_features * e.out_features for e in eligible],
                            target, structure, opts["lam"])
    elif method == "uniform":
        levels = uniform_levels(len(eligible), target, structure)
    else:
        raise ValueError(f"unknown weight_allocation {method!r}; use 'owl' or 'uniform'")
    for entry, level in zip(eligible, levels):
        entry.level, entry.allocated_by = float(level), method


def _permuted_parameters(ctx: CompileContext) -> dict[str, tuple[int, list[int]]]:
    """The parameters fuse_heads permuted (its :class:`~sparsec.ir.plan.FuseRecord`): name -> (axis, index)."""
    return {target: (moved["axis"], moved["index"]) for site in ctx.plan.attention if site.fusion
            for target, moved in site.fusion.permuted_parameters.items()}


class SparsifyWeights:
    """The pass: analyse the linears (or reuse ``ctx.linear_analysis`` while it is current,
    following fuse_heads' weight permutations), allocate levels (``ctx.weight_levels`` when
    given or searched) and rewrite."""

    name = "sparsify_weights"

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        opts = _options(ctx)
        if not opts["sparsity"] and not opts["levels"]:
            return PassResult(gm, False, {"linears_sparse": 0}, {"skipped": "weight sparsity not requested"})
        analysis = ctx.linear_analysis
        if analysis is None or not (analysis.is_current(gm)
                                    or analysis.follow_permutations(gm, _permuted_parameters(ctx))):
            analysis = analyze_linears(gm, ctx)
        entries = ctx.plan.linears
        allocate(entries, opts)
        return _rewrite_all(gm, ctx, analysis, entries, opts)


def _rewrite_all(gm, ctx, analysis: LinearAnalysis, entries: list[LinearPlan], opts: dict) -> PassResult:
    nodes = {n.name: n for n in gm.graph.nodes}
    chosen = [e for e in entries if e.eligible and e.level > 0]
    masks = {e.node: analysis.keep_mask(e.node, e.level) for e in chosen}
    for entry in chosen:
        weight = get_tensor(gm, entry.weight)
        pruned = weight.detach() * masks[entry.node]
        entry.error = analysis.local_error(entry.node, pruned)
        if opts["measure_each"]:
            entry.measured_contribution = analysis.model_error(entry.node, pruned.to(weight.dtype))
    dense_bytes = compressed_bytes = pruned_count = total = 0
    for entry in entries:
        if not entry.eligible:
            continue
        weight = get_tensor(gm, entry.weight)
        total += weight.numel()
        dense_bytes += weight.numel() * weight.element_size()
        if entry.level <= 0:
            compressed_bytes += weight.numel() * weight.element_size()
            continue
        keep = masks[entry.node]
        values, mask, layout = compress(weight.detach(), keep, opts["structure"])
        entry.density = values.numel() / weight.numel()
        pruned_count += weight.numel() - values.numel()
        entry.dense_bytes = weight.numel() * weight.element_size()
        entry.compressed_bytes = storage_bytes(values, mask)
        compressed_bytes += entry.compressed_bytes
        entry.lowering = plan_lowering(layout, 1 - entry.density, ctx.target)
        entry.node = _rewrite_linear(gm, nodes[entry.node], entry.weight, values, mask, layout).name
    ctx.linear_analysis = None          # its linears are rewritten
    runner = GraphRunner(gm)
    measured = output_error([runner.run(args, kwargs) for args, kwargs in analysis.batches], analysis.references)
    contributions = [e.measured_contribution for e in chosen if e.measured_contribution is not None]
    summary = WeightsRecord(
        structure=str(opts["structure"]), score=opts["score"], target=opts["sparsity"],
        global_sparsity=pruned_count / total if total else 0.0,
        predicted_error=math.sqrt(sum(c * c for c in contributions)) if contributions else None,
        measured_error=measured, dense_bytes=dense_bytes, compressed_bytes=compressed_bytes)
    ctx.plan.weights = summary
    stats = {"linears_sparse": len(chosen), "linears_dense": len(entries) - len(chosen),
             "global_sparsity": round(summary.global_sparsity, 4), "measured_error": measured}
    decisions = {e.name: (f"{e.structure} level {e.level:.3f}" if e.level > 0
                          else f"dense: {e.reason or 'level 0'}") for e in entries}
    return PassResult(gm, bool(chosen), stats, decisions)


def _rewrite_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, weight_target: str, values: torch.Tensor,
                    mask: torch.Tensor, layout: Layout) -> torch.fx.Node:
    """Replace ``node`` by ``sparse_linear`` over buffers ``<weight>_values`` / ``<weight>_mask``
    registered next to the weight, and drop the dense weight."""
    owner_path, _, attr = weight_target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    owner.register_buffer(f"{attr}_values", values)
    owner.register_buffer(f"{attr}_mask", mask)
    prefix = f"{owner_path}." if owner_path else ""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    weight_node = node.args[1]
    with gm.graph.inserting_before(node):
        values_node = gm.graph.get_attr(f"{prefix}{attr}_values")
        mask_node = gm.graph.get_attr(f"{prefix}{attr}_mask")
        sparse = gm.graph.call_function(SPARSE_LINEAR, (node.args[0], values_node, mask_node, bias, layout.encode()))
    sparse.meta.update(node.meta)
    node.replace_all_uses_with(sparse)
    gm.graph.erase_node(node)
    if not weight_node.users:
        gm.graph.erase_node(weight_node)
        delattr(owner, attr)
    return sparse
