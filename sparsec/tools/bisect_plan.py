"""Bisect an accuracy regression: which layers and heads of a plan push the error over a threshold.

``sparsec.tools.bisect_plan(model, plan, inputs, metric, threshold)`` recompiles the model with parts
of the plan toggled dense (``compile(..., plan=...)``) and measures ``metric`` against the
dense model. It narrows the sparse sites (layers) first, then the sparse heads of the
culprit sites, each with delta debugging (Zeller and Hildebrandt, "Simplifying and
Isolating Failure-Inducing Input", 2002): the result is a 1-minimal set, i.e. sparsifying
just those heads exceeds the threshold and dropping any one of them does not.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from sparsec.ir.inputs import as_call, relative_l2
from sparsec.ir.plan import Plan

Head = tuple[str, int]   # (site name, head index)


@dataclass
class BisectResult:
    """What :func:`bisect` found. ``heads`` is empty when the whole plan is within the threshold."""

    threshold: float
    full_error: float                        # error of the whole plan
    sites: list[str] = field(default_factory=list)    # minimal set of culprit sites (layers)
    heads: list[Head] = field(default_factory=list)   # minimal set of culprit heads
    error: float | None = None               # error with only ``heads`` sparse
    repaired_error: float | None = None      # error of the whole plan with ``heads`` made dense
    compiles: int = 0

    def summary(self) -> str:
        lines = [f"whole plan: error {self.full_error:.4g} (threshold {self.threshold:g})"]
        if not self.heads:
            lines.append("within the threshold: nothing to bisect")
            return "\n".join(lines)
        lines.append(f"culprit layers: {', '.join(self.sites)}")
        lines.append(f"culprit heads (sparse alone: error {self.error:.4g}): "
                     + ", ".join(f"{site} head {head}" for site, head in self.heads))
        lines.append(f"whole plan with these heads dense: error {self.repaired_error:.4g}")
        if self.repaired_error > self.threshold:
            lines.append("still over the threshold: other heads add up too; bisect again on "
                         "make_dense(plan, result.heads) (from sparsec.tools.bisect_plan import make_dense)")
        lines.append(f"{self.compiles} compiles")
        return "\n".join(lines)


def make_dense(plan: Plan, heads: Iterable[Head]) -> Plan:
    """A copy of ``plan`` with the given (site name, head) pairs dense."""
    edited = Plan.from_dict(plan.to_dict())
    for name, index in heads:
        head = edited.site(name).heads[index]
        head.assign("dense", {}, "made dense by sparsec.tools.bisect_plan")
        head.recall, head.density = 1.0, 1.0
    edited.regroup()
    return edited


def _split(units: list, parts: int) -> list[list]:
    size, extra = divmod(len(units), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        chunks.append(units[start:end])
        start = end
    return chunks


def _reduce(units: list, parts: int, fails: Callable[[list], bool]) -> tuple[list, int] | None:
    """One ddmin step: a failing chunk, else a failing complement, else None."""
    chunks = _split(units, parts)
    for chunk in chunks:
        if fails(chunk):
            return chunk, 2
    if parts > 2:   # with two chunks each complement is the other chunk, already tried
        for chunk in chunks:
            complement = [unit for unit in units if unit not in chunk]
            if fails(complement):
                return complement, max(parts - 1, 2)
    return None


def ddmin(units: list, fails: Callable[[list], bool]) -> list:
    """A 1-minimal sub-list of ``units`` (which must fail) that still fails."""
    parts = 2
    while len(units) >= 2:
        reduced = _reduce(units, parts, fails)
        if reduced is not None:
            units, parts = reduced
        elif parts >= len(units):
            break
        else:
            parts = min(len(units), 2 * parts)
    return units


def bisect(model: torch.nn.Module, plan: Plan, inputs: Any,
           metric: Callable[[Any, Any], float] | None = None, threshold: float = 0.02,
           target: str | None = None) -> BisectResult:
    """Find a minimal set of layers, then heads, whose sparsification alone exceeds ``threshold``.

    Args:
        model: the dense model the plan was made for.
        plan: the plan whose error is too high (``cm.plan``, or ``Plan.from_json``).
        inputs: example inputs, as for :func:`sparsec.compile`.
        metric: ``metric(dense_output, sparse_output) -> float``, larger is worse; defaults to
            the relative L2 error over every floating-point output.
        threshold: an error above this is a failure.
        target: compile target; defaults to the plan's.
    """
    from sparsec.compiler import compile as sparsec_compile

    metric = metric or relative_l2
    args, kwargs = as_call(inputs)
    with torch.no_grad():
        reference = model.eval()(*args, **kwargs)
    sparse = [(site.name, head.head) for site in plan.attention for head in site.heads if not head.is_dense]
    errors: dict[frozenset, float] = {}

    def error_with_sparse(kept: Iterable[Head]) -> float:
        key = frozenset(kept)
        if key not in errors:
            trial = make_dense(plan, [head for head in sparse if head not in key])
            compiled = sparsec_compile(model, inputs, plan=trial, target=target or plan.target)
            with torch.no_grad():
                errors[key] = float(metric(reference, compiled(*args, **kwargs)))
        return errors[key]

    result = BisectResult(threshold, error_with_sparse(sparse))
    if result.full_error <= threshold:
        result.compiles = len(errors)
        return result

    def heads_of(sites: list[str]) -> list[Head]:
        return [head for head in sparse if head[0] in sites]

    sites = list(dict.fromkeys(name for name, _ in sparse))
    result.sites = ddmin(sites, lambda chosen: error_with_sparse(heads_of(chosen)) > threshold)
    result.heads = ddmin(heads_of(result.sites), lambda chosen: error_with_sparse(chosen) > threshold)
    result.error = error_with_sparse(result.heads)
    result.repaired_error = error_with_sparse([head for head in sparse if head not in result.heads])
    result.compiles = len(errors)
    return result


def _load_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"{spec!r}: write the model factory as MODULE:FUNCTION, e.g. mypkg.models:build")
    if str(Path.cwd()) not in sys.path:   # console scripts do not put the working directory there
        sys.path.insert(0, str(Path.cwd()))
    return getattr(importlib.import_module(module_name), attribute)


def _read_plan(path: Path) -> Plan:
    """A plan file, a dump directory's ``plan.json``, or an artifact's plan after load's
    checks (hashes and plan/program binding, ``runtime.artifact.read_plan_json``)."""
    from sparsec.runtime.artifact import read_plan_json

    if not path.exists():
        raise FileNotFoundError(f"plan {path} does not exist; pass plan.json, or a dump or artifact "
                                "directory holding one")
    if path.is_dir() and (path / "manifest.json").exists():
        return Plan.from_json(read_plan_json(path))
    file = path / "plan.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no plan.json; pass plan.json, or a dump or artifact directory")
    return Plan.from_json(file.read_text())


def add_parser(subparsers) -> None:
    """Register ``sparsec bisect``."""
    parser = subparsers.add_parser(
        "bisect", help="find the layers / heads of a plan whose sparsification exceeds an error threshold",
        description=__doc__.split("\n\n")[1])
    parser.add_argument("factory", help="MODULE:FUNCTION returning (model, example_inputs), or a model "
                                        "when --inputs is given")
    parser.add_argument("plan", help="plan.json, or a dump / artifact directory holding one")
    parser.add_argument("--threshold", type=float, default=0.02, help="relative L2 error that counts as a failure")
    parser.add_argument("--inputs", help="inputs saved with torch.save (a tuple of args or a dict of kwargs)")
    parser.add_argument("--target", help="compile target (default: the plan's)")
    parser.set_defaults(handler=_run)


def _run(args) -> int:
    plan = _read_plan(Path(args.plan))                 # a bad path fails before the model is built
    built = _load_factory(args.factory)()
    if args.inputs:
        model, inputs = (built[0] if isinstance(built, tuple) else built), torch.load(args.inputs)
    elif isinstance(built, tuple):
        model, inputs = built
    else:
        print("sparsec bisect: the factory returned only a model; pass --inputs", file=sys.stderr)
        return 2
    result = bisect(model, plan, inputs, threshold=args.threshold, target=args.target)
    print(result.summary())
    return 0
