"""sparsify_weights: prune linear weights and rewrite them to ``sparsec.sparse_linear``.

Linears are ``aten.linear`` nodes whose weight is a ``get_attr`` parameter used by no
other node (``nn.Linear`` and Hugging Face linears capture this way). For each one:

1. calibrate: an fx Interpreter runs the calibration batches and records the linear's
   input, ``sum_t X[t, j]^2`` per input feature (Wanda's ``||X_j||^2``) and a sample of rows;
2. score (``wanda`` or ``magnitude``) and measure candidates: for every level the
   structure allows, the relative L2 change of the linear's output on the sampled rows
   (the layer's *sensitivity*) and the FLOPs per token left;
3. allocate levels for the global target: OWL (more outliers, less pruning) for
   unstructured and block structures, uniform for N:M; or levels given by a search
   (``ctx.weight_levels`` / :meth:`SparsifyWeights.apply_levels`);
4. rewrite: the dense weight is replaced by its compressed form (kept values + bit mask,
   :mod:`sparsec.weights.storage`) registered as buffers, and the node by
   ``sparse_linear(x, values, mask, bias, layout)``, so a saved program shrinks.

Configuration: ``ctx.weights`` (:class:`sparsec.WeightSparsity`: structure, sparsity, score,
exclude and the tuning knobs; the pass does nothing without a sparsity or levels),
``ctx.weight_levels`` / ``ctx.weight_levels_by`` (each linear's level, given or chosen by
the search) and ``ctx.weight_calibration_batches`` (see :class:`~sparsec.pass_manager.CompileContext`).

Each linear's plan entry (``ctx.plan.linears``) records structure, level, score,
``candidates`` [{level, error, cost[, model_error]}] for a budgeted search (``error``: the
relative L2 change of this linear's output on calibration activations; ``cost``: FLOPs per
token left), the local error at the chosen level, the measured contribution to the model's
output error, storage bytes and how the target will run it (``lowering``); an entry the
search decided also keeps its ``search`` record across the re-analysis here.
``ctx.plan.extra["weights"]`` sums up: global sparsity, predicted and measured output
error on the calibration batches, dense and compressed bytes.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx._pytree import tree_flatten_spec

from sparsec.pass_manager import CompileContext, PassResult
from sparsec.runtime.sparse_linear_gpu import plan_lowering
from sparsec.weights import (COMPARISON_GROUP, Layout, compress, outlier_ratio, owl_levels, parse_structure,
                             score_weight, storage_bytes, uniform_levels)
from sparsec.weights.config import WeightSparsity

from .attention_sites import module_path

LINEAR = torch.ops.aten.linear.default
SPARSE_LINEAR = torch.ops.sparsec.sparse_linear.default


@dataclass
class LinearInputs:
    """Calibration statistics of one linear's input activations."""

    sq_norm: torch.Tensor      # [in_features] float32: sum over tokens of x^2
    rows: torch.Tensor         # [r, in_features] float32: sampled input rows
    tokens: int


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
        "batches": ctx.weight_calibration_batches,
        "rows": weights.calibration_rows,
        "measure_each": weights.measure_each,
        "model_error": weights.candidate_model_error,
    }


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name, "*." + p) for p in patterns)


def _get_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def find_linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """``aten.linear`` nodes whose weight is a ``get_attr``, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == LINEAR
            and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "get_attr"]


def _shared_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    target = node.args[1].target
    users = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]
    return len(users) > 1


class _LinearInterpreter(torch.fx.Interpreter):
    """Runs the graph, recording the inputs of ``record``'s linears and computing the
    linears in ``replace`` with the given weight instead of their own."""

    def __init__(self, gm, record: dict[str, LinearInputs] | None = None,
                 replace: dict[str, torch.Tensor] | None = None, rows_per_batch: int = 0):
        super().__init__(gm)
        self.record, self.replace, self.rows_per_batch = record, replace or {}, rows_per_batch

    def run_node(self, n: torch.fx.Node):
        if n.name in self.replace:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return n.target(args[0], self.replace[n.name], *args[2:], **kwargs)
        if self.record is not None and n.name in self.record:
            self._record(n.name, self.env[n.args[0]])
        return super().run_node(n)

    def _record(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        stats = self.record[name]
        stats.sq_norm += (x * x).sum(dim=0)
        stats.tokens += x.shape[0]
        stride = max(1, math.ceil(x.shape[0] / self.rows_per_batch))
        stats.rows = torch.cat([stats.rows, x[::stride][: self.rows_per_batch]])


def run_graph(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, **interpreter_kwargs) -> list:
    """Run ``gm`` on one (args, kwargs) call through a :class:`_LinearInterpreter`; flat outputs."""
    in_spec = getattr(gm, "_in_spec", None)
    flat = tree_flatten_spec((args, kwargs), in_spec) if in_spec is not None else list(args)
    with torch.no_grad():
        out = _LinearInterpreter(gm, **interpreter_kwargs).run(*flat, enable_io_processing=False)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def output_error(outputs: list[list], references: list[list]) -> float:
    """Relative L2 error over every floating output tensor of every batch."""
    num = den = 0.0
    for out, ref in zip(outputs, references):
        for a, b in zip(out, ref):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                num += float((a.float() - b.float()).pow(2).sum())
                den += float(b.float().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _local_error(rows: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor, bias) -> float:
    """Relative L2 change of the linear's output on ``rows`` when ``weight`` becomes ``pruned``."""
    w = weight.detach().float()
    out = rows @ w.T + (0 if bias is None else bias.detach().float())
    change = rows @ (w - pruned.float()).T
    return float(change.norm() / out.norm().clamp_min(1e-30))


class SparsifyWeights:
    """The pass. :meth:`analyze` fills ``ctx.plan.linears`` with candidates; :meth:`run`
    allocates levels and rewrites; :meth:`apply_levels` rewrites with levels chosen elsewhere."""

    name = "sparsify_weights"

    def __init__(self):
        self.inputs: dict[str, LinearInputs] | None = None
        self.references: list[list] = []

    def _batches(self, ctx: CompileContext) -> list[tuple[tuple, dict]]:
        calls = list(ctx.calibration) or [(tuple(ctx.example_args), dict(ctx.example_kwargs or {}))]
        count = _options(ctx)["batches"]
        return calls[:count] if count else calls

    def _bias(self, gm, node: torch.fx.Node):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return _get_attr(gm, bias.target) if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None

    def _scores(self, gm, entry: dict, opts: dict) -> torch.Tensor:
        stats = (self.inputs or {}).get(entry["node"])
        return score_weight(_get_attr(gm, entry["weight"]), opts["score"], None if stats is None else stats.sq_norm)

    def pruned_weight(self, gm, ctx: CompileContext, entry: dict, level: float) -> torch.Tensor:
        """``entry``'s weight with a fraction ``level`` pruned, as the rewrite prunes it (after :meth:`analyze`)."""
        opts = _options(ctx)
        keep = opts["structure"].mask(self._scores(gm, entry, opts), level, COMPARISON_GROUP[opts["score"]])
        return _get_attr(gm, entry["weight"]).detach() * keep

    def _model_error(self, gm, batch: tuple[tuple, dict], node: str, pruned: torch.Tensor) -> float:
        """Error of the model's outputs on ``batch`` (the first calibration batch) with only
        linear ``node`` pruned."""
        args, kwargs = batch
        return output_error([run_graph(gm, args, kwargs, replace={node: pruned})], self.references[:1])

    def analyze(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> list[dict]:
        """Calibrate, score and measure every eligible linear; write and return ``ctx.plan.linears``."""
        opts = _options(ctx)
        structure = opts["structure"]
        nodes = {n.name: n for n in gm.graph.nodes}
        entries = []
        for node in find_linears(gm):
            param = _get_attr(gm, node.args[1].target)
            out_features, in_features = param.shape
            entry = {"name": module_path(node), "node": node.name, "weight": node.args[1].target,
                     "in_features": int(in_features), "out_features": int(out_features),
                     "structure": str(structure), "score": opts["score"],
                     "comparison": COMPARISON_GROUP.get(opts["score"]), "level": 0.0, "density": 1.0,
                     "allocated_by": None, "outlier_ratio": None, "candidates": [], "error": 0.0,
                     "measured_contribution": None, "reason": ""}
            if _excluded(entry["name"], opts["exclude"]):
                entry["reason"] = f"excluded (matches one of {list(opts['exclude'])})"
            elif _shared_weight(gm, node):
                entry["reason"] = "weight is shared with another node (tied); left dense"
            elif not param.is_floating_point():
                entry["reason"] = f"weight dtype {param.dtype} is not floating point"
            elif misfit := structure.misfit(out_features, in_features):
                entry["reason"] = f"{structure} does not fit: {misfit}"
            entries.append(entry)
        eligible = [e for e in entries if not e["reason"]]
        batches = self._batches(ctx)
        self.inputs = {}
        for e in eligible:
            device = _get_attr(gm, e["weight"]).device
            self.inputs[e["node"]] = LinearInputs(torch.zeros(e["in_features"], device=device),
                                                  torch.zeros(0, e["in_features"], device=device), 0)
        rows_per_batch = max(1, opts["rows"] // len(batches))
        self.references = [run_graph(gm, args, kwargs, record=self.inputs, rows_per_batch=rows_per_batch)
                           for args, kwargs in batches]
        group = COMPARISON_GROUP[opts["score"]]
        for entry in eligible:
            stats, weight = self.inputs[entry["node"]], _get_attr(gm, entry["weight"])
            scores = self._scores(gm, entry, opts)
            entry["outlier_ratio"] = outlier_ratio(scores, opts["threshold"])
            bias = self._bias(gm, nodes[entry["node"]])
            flops = 2 * entry["in_features"] * entry["out_features"]
            for level in structure.levels():
                keep = structure.mask(scores, level, group)
                realised = 1 - float(keep.float().mean())   # small layers round levels together
                if any(abs(c["level"] - realised) < 1e-9 for c in entry["candidates"]):
                    continue
                pruned = weight.detach() * keep
                candidate = {"level": realised, "error": _local_error(stats.rows, weight, pruned, bias),
                             "cost": flops * (1 - realised)}
                if opts["model_error"]:
                    candidate["model_error"] = self._model_error(gm, batches[0], entry["node"], pruned.to(weight.dtype))
                entry["candidates"].append(candidate)
        # Fusing heads after a search permutes q/k/v/o weights, so the rewrite analyses again;
        # what the search recorded stays with its linear.
        searched = {e["name"]: e["search"] for e in ctx.plan.linears if "search" in e}
        for entry in entries:
            if entry["name"] in searched:
                entry["search"] = searched[entry["name"]]
        ctx.plan.linears = entries
        return entries

    def allocate(self, entries: list[dict], opts: dict) -> None:
        """Set ``level`` of every eligible entry: given levels, else OWL or uniform for ``sparsity``."""
        eligible = [e for e in entries if not e["reason"]]
        structure = opts["structure"]
        if opts["levels"]:
            for entry in eligible:
                entry["level"] = structure.nearest_level(float(opts["levels"].get(entry["name"], 0.0)))
                entry["allocated_by"] = opts["levels_by"]
            return
        target = float(opts["sparsity"])
        method = opts["allocation"] or ("uniform" if structure.discrete else "owl")
        if method == "owl":
            levels = owl_levels([e["outlier_ratio"] for e in eligible],
                                [e["in_features"] * e["out_features"] for e in eligible],
                                target, structure, opts["lam"])
        elif method == "uniform":
            levels = uniform_levels(len(eligible), target, structure)
        else:
            raise ValueError(f"unknown weight_allocation {method!r}; use 'owl' or 'uniform'")
        for entry, level in zip(eligible, levels):
            entry["level"], entry["allocated_by"] = float(level), method

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        opts = _options(ctx)
        if not opts["sparsity"] and not opts["levels"]:
            return PassResult(gm, False, {"linears_sparse": 0}, {"skipped": "weight sparsity not requested"})
        entries = ctx.plan.linears if self.inputs is not None else self.analyze(gm, ctx)
        self.allocate(entries, opts)
        return self._rewrite_all(gm, ctx, entries, opts)

    def apply_levels(self, gm: torch.fx.GraphModule, ctx: CompileContext, levels: dict[str, float]) -> PassResult:
        """Rewrite with per-linear ``levels`` ({plan name: level}) chosen by a search."""
        opts = _options(ctx)
        opts["levels"], opts["levels_by"] = levels, "search"
        entries = ctx.plan.linears if self.inputs is not None else self.analyze(gm, ctx)
        self.allocate(entries, opts)
        return self._rewrite_all(gm, ctx, entries, opts)

    def _rewrite_all(self, gm, ctx, entries: list[dict], opts: dict) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        chosen = [e for e in entries if not e["reason"] and e["level"] > 0]
        batches = self._batches(ctx)
        group = COMPARISON_GROUP[opts["score"]]
        masks = {e["node"]: opts["structure"].mask(self._scores(gm, e, opts), e["level"], group) for e in chosen}
        for entry in chosen:
            weight = _get_attr(gm, entry["weight"])
            pruned = weight.detach() * masks[entry["node"]]
            stats = self.inputs[entry["node"]]
            entry["error"] = _local_error(stats.rows, weight, pruned, self._bias(gm, nodes[entry["node"]]))
            if opts["measure_each"]:
                entry["measured_contribution"] = self._model_error(gm, batches[0], entry["node"],
                                                                   pruned.to(weight.dtype))
        dense_bytes = compressed_bytes = pruned_count = total = 0
        for entry in entries:
            if entry["reason"]:
                continue
            weight = _get_attr(gm, entry["weight"])
            total += weight.numel()
            dense_bytes += weight.numel() * weight.element_size()
            if entry["level"] <= 0:
                compressed_bytes += weight.numel() * weight.element_size()
                continue
            keep = masks[entry["node"]]
            values, mask, layout = compress(weight.detach(), keep, opts["structure"])
            entry["density"] = values.numel() / weight.numel()
            pruned_count += weight.numel() - values.numel()
            entry["dense_bytes"] = weight.numel() * weight.element_size()
            entry["compressed_bytes"] = storage_bytes(values, mask)
            compressed_bytes += entry["compressed_bytes"]
            entry["lowering"] = plan_lowering(layout, 1 - entry["density"], ctx.target)
            entry["node"] = _rewrite_linear(gm, nodes[entry["node"]], entry["weight"], values, mask, layout).name
        if chosen:
            gm.graph.lint()
            gm.recompile()
        measured = output_error([run_graph(gm, args, kwargs) for args, kwargs in batches], self.references)
        contributions = [e["measured_contribution"] for e in chosen if e["measured_contribution"] is not None]
        # Predicted: the per-linear contributions combined as independent errors.
        summary = {"structure": str(opts["structure"]), "score": opts["score"], "target": opts["sparsity"],
                   "global_sparsity": pruned_count / total if total else 0.0,
                   "predicted_error": math.sqrt(sum(c * c for c in contributions)) if contributions else None,
                   "measured_error": measured, "dense_bytes": dense_bytes, "compressed_bytes": compressed_bytes}
        ctx.plan.extra["weights"] = summary
        stats = {"linears_sparse": len(chosen), "linears_dense": len(entries) - len(chosen),
                 "global_sparsity": round(summary["global_sparsity"], 4), "measured_error": measured}
        decisions = {e["name"]: (f"{e['structure']} level {e['level']:.3f}" if e["level"] > 0
                                 else f"dense: {e['reason'] or 'level 0'}") for e in entries}
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
