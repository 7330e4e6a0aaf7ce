"""What pruning each linear costs: its input statistics on the calibration batches, its
weight scores, and the error a pruned weight causes, in its own output and the model's.

One :class:`LinearAnalysis` is recorded per compile (one graph run per calibration batch,
:class:`~sparsec.analysis.graph_runner.GraphRunner` observing every analysed linear): the
search prices each linear's levels with it, and ``sparsify_weights`` rewrites from it. It
stays valid while the graph is unchanged and every analysed linear computes with the
weight it analysed (:meth:`LinearAnalysis.is_current`). Fusing heads by permuting weights
replaces them; the analysis follows such a permutation
(:meth:`LinearAnalysis.follow_permutations`: a linear whose input features moved has its
statistics moved the same way), and only a changed graph makes the rewrite analyse again.

A linear is an ``aten.linear`` node whose weight is a ``get_attr`` parameter
(:func:`find_linears`). Statistics per linear (:class:`LinearInputs`):
``sum_t X[t, j]^2`` per input feature (Wanda's ``||X_j||^2``) and a sample of input rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
from torch.utils import _pytree as pytree

from sparsec.weights import COMPARISON_GROUP, Structure, outlier_ratio, score_weight

from sparsec.analysis.graph_runner import GraphRunner, replace_argument

LINEAR = torch.ops.aten.linear.default


def get_tensor(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` target names."""
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def find_linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """``aten.linear`` nodes whose weight is a ``get_attr``, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == LINEAR
            and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "get_attr"]


def weight_is_shared(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether the linear's weight feeds another node too (tied weights)."""
    target = node.args[1].target
    users = [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]
    return len(users) > 1


def linear_bias(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    """The linear's bias when it is a ``get_attr`` parameter."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return get_tensor(gm, bias.target) if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None


@dataclass
class LinearInputs:
    """Calibration statistics of one linear's input activations."""

    sq_norm: torch.Tensor      # [in_features] float32: sum over tokens of x^2
    rows: torch.Tensor         # [r, in_features] float32: sampled input rows
    tokens: int

    def add(self, x: torch.Tensor, rows_per_batch: int) -> None:
        """Add one batch of inputs ``[..., in_features]``, sampling at most ``rows_per_batch`` rows."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq_norm += (x * x).sum(dim=0)
        self.tokens += x.shape[0]
        stride = max(1, math.ceil(x.shape[0] / rows_per_batch))
        self.rows = torch.cat([self.rows, x[::stride][:rows_per_batch]])


def output_error(outputs: list, references: list) -> float:
    """Relative L2 error over every floating output tensor of every batch (model outputs,
    any pytree of tensors)."""
    num = den = 0.0
    for out, ref in zip(outputs, references):
        for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                num += float((a.float() - b.float()).pow(2).sum())
                den += float(b.float().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def local_error(rows: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor, bias) -> float:
    """Relative L2 change of the linear's output on ``rows`` when ``weight`` becomes ``pruned``."""
    w = weight.detach().float()
    out = rows @ w.T + (0 if bias is None else bias.detach().float())
    change = rows @ (w - pruned.float()).T
    return float(change.norm() / out.norm().clamp_min(1e-30))


class LinearAnalysis:
    """The input statistics of ``nodes`` (linears of ``gm``) and the dense outputs, recorded
    on ``batches`` (``(args, kwargs)`` calls) with at most ``rows`` sampled input rows per
    linear; weights scored with ``score`` (``wanda`` | ``magnitude``) and pruned by ``structure``."""

    def __init__(self, gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], batches: list[tuple[tuple, dict]],
                 structure: Structure, score: str, rows: int):
        self.gm, self.batches, self.structure, self.score = gm, batches, structure, score
        self.nodes = {node.name: node for node in nodes}
        self.weights = {node.name: get_tensor(gm, node.args[1].target) for node in nodes}
        self.inputs = {name: LinearInputs(torch.zeros(w.shape[1], device=w.device),
                                          torch.zeros(0, w.shape[1], device=w.device), 0)
                       for name, w in self.weights.items()}
        rows_per_batch = max(1, rows // len(batches))

        def record(node, args, kwargs, output):
            self.inputs[node.name].add(args[0], rows_per_batch)

        self.graph_text = str(gm.graph)
        self.runner = GraphRunner(gm)
        observe = dict.fromkeys(nodes, record)
        self.references = [self.runner.run(args, kwargs, observe=observe) for args, kwargs in batches]

    def is_current(self, gm: torch.fx.GraphModule) -> bool:
        """Whether this analysis still describes ``gm``: the same graph module and graph, and
        every analysed linear computing with the weight it was analysed with."""
        return gm is self.gm and str(gm.graph) == self.graph_text and all(
            get_tensor(gm, self.nodes[name].args[1].target) is weight for name, weight in self.weights.items())

    def follow_permutations(self, gm: torch.fx.GraphModule, permuted: dict[str, tuple[int, list[int]]]) -> bool:
        """Take the weights of ``gm`` that are permutations of the analysed ones: ``permuted``
        maps a parameter to ``(axis, index)``, it became ``index_select(axis, index)`` of
        itself, the graph computing the same function (fuse_heads' head order). Permuted
        output rows leave a linear's input as it was; permuted input columns mean its input
        features moved the same way, and so do their statistics. Returns whether the analysis
        is current afterwards; it is left unchanged when not (another change than these)."""
        if gm is not self.gm or str(gm.graph) != self.graph_text:
            return False
        moved = {}
        for name, node in self.nodes.items():
            target = node.args[1].target
            weight = get_tensor(gm, target)
            if weight is self.weights[name]:
                continue
            if target not in permuted:
                return False
            axis, index = permuted[target]
            index = torch.as_tensor(index, device=weight.device)
            if not torch.equal(weight, self.weights[name].index_select(axis, index)):
                return False
            moved[name] = (weight, axis, index)
        for name, (weight, axis, index) in moved.items():
            self.weights[name] = weight
            if axis == 1:
                inputs = self.inputs[name]
                self.inputs[name] = LinearInputs(inputs.sq_norm[index], inputs.rows[:, index], inputs.tokens)
        return True

    def scores(self, name: str) -> torch.Tensor:
        """The weight scores of linear ``name`` (higher: kept longer)."""
        return score_weight(self.weights[name], self.score, self.inputs[name].sq_norm)

    def keep_mask(self, name: str, level: float) -> torch.Tensor:
        """Which weights of linear ``name`` stay when a fraction ``level`` is pruned."""
        return self.structure.mask(self.scores(name), level, COMPARISON_GROUP[self.score])

    def pruned_weight(self, name: str, level: float) -> torch.Tensor:
        """Linear ``name``'s weight with a fraction ``level`` pruned, as the rewrite prunes it."""
        return self.weights[name].detach() * self.keep_mask(name, level)

    def local_error(self, name: str, pruned: torch.Tensor) -> float:
        """Relative L2 change of linear ``name``'s output on its sampled inputs with ``pruned``."""
        return local_error(self.inputs[name].rows, self.weights[name], pruned,
                           linear_bias(self.gm, self.nodes[name]))

    def model_error(self, name: str, pruned: torch.Tensor) -> float:
        """Error of the model's outputs on the first batch with only linear ``name`` pruned."""
        args, kwargs = self.batches[0]
        output = self.runner.run(args, kwargs, replace={self.nodes[name]: replace_argument(1, pruned)})
        return output_error([output], self.references[:1])

    def candidates(self, name: str, with_model_error: bool) -> list[dict]:
        """Per level the structure allows (levels that round together counted once):
        ``{level, error, cost[, model_error]}``, ``cost`` the FLOPs per token left."""
        weight = self.weights[name]
        scores = self.scores(name)
        flops = 2 * weight.shape[0] * weight.shape[1]
        found: list[dict] = []
        for level in self.structure.levels():
            keep = self.structure.mask(scores, level, COMPARISON_GROUP[self.score])
            realised = 1 - float(keep.float().mean())   # small layers round levels together
            if any(abs(c["level"] - realised) < 1e-9 for c in found):
                continue
            pruned = weight.detach() * keep
            candidate = {"level": realised, "error": self.local_error(name, pruned), "cost": flops * (1 - realised)}
            if with_model_error:
                candidate["model_error"] = self.model_error(name, pruned.to(weight.dtype))
            found.append(candidate)
        return found

    def outlier_ratio(self, name: str, threshold: float) -> float:
        """OWL's outlier ratio of linear ``name``'s scores."""
        return outlier_ratio(self.scores(name), threshold)
