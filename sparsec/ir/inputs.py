"""Normalising and checking model inputs: example, calibration and serving calls."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils import _pytree as pytree

from sparsec.ir.errors import CalibrationMismatchError, InvalidArgumentError


def as_call(inputs: Any) -> tuple[tuple, dict]:
    """A tuple of positional args, a dict of keyword args, or one tensor, as (args, kwargs)."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def leaf_signature(args: tuple, kwargs: dict) -> tuple[Any, list]:
    """The pytree structure and, per tensor leaf, (ndim, dtype); other leaves by value type."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    signature = [(leaf.dim(), leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                 for leaf in leaves]
    return spec, signature


def calibration_calls(calibration: Iterable | None, example: tuple[tuple, dict]) -> list[tuple[tuple, dict]]:
    """Calibration batches as (args, kwargs), each checked against the example's structure."""
    if calibration is None:
        return [example]
    calls = [as_call(batch) for batch in calibration]
    if not calls:
        raise CalibrationMismatchError("calibration is empty; pass at least one batch, or leave "
                                       "calibration=None to calibrate on the example inputs")
    spec, signature = leaf_signature(*example)
    for index, call in enumerate(calls):
        batch_spec, batch_signature = leaf_signature(*call)
        if batch_spec != spec:
            raise CalibrationMismatchError(
                f"calibration batch {index} has structure {batch_spec}, but the example inputs have "
                f"{spec}; pass calibration batches built like example_inputs (same args / keyword names)")
        if batch_signature != signature:
            raise CalibrationMismatchError(
                f"calibration batch {index} has tensor ranks/dtypes {batch_signature}, the example has "
                f"{signature}; give calibration tensors the example's rank and dtype")
        _check_fixed_sizes(example, call, index)
    return calls


def _check_fixed_sizes(example: tuple[tuple, dict], call: tuple[tuple, dict], index: int) -> None:
    """torch.export fixes every dimension whose example size is 1 (its 0/1 specialisation):
    a calibration batch that differs there would fail deep inside the graph with "Guard
    failed"; name the input, the dimension and the two fixes instead."""
    example_leaves, _ = pytree.tree_flatten_with_path(example)     # paths start with 0 (args) or 1 (kwargs)
    call_leaves = [leaf for _path, leaf in pytree.tree_flatten_with_path(call)[0]]
    for (path, expected), got in zip(example_leaves, call_leaves):
        if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
            continue
        for dim, (size, new) in enumerate(zip(expected.shape, got.shape)):
            if size == 1 and new != 1:
                raise CalibrationMismatchError(
                    f"calibration batch {index}: {('positional', 'keyword')[path[0].idx]} input "
                    f"{pytree.keystr(path[1:])} has size {new} on dimension "
                    f"{dim}, where the example inputs have size 1, and torch.export fixes every dimension "
                    "whose example size is 1; compile with example inputs whose batch and sequence sizes "
                    f"are at least 2, or calibrate at the example's size 1 on that dimension")


def check_recall(recall: Any) -> float:
    """``recall`` as a float in (0, 1], or :class:`InvalidArgumentError` naming the range."""
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0.0 < recall <= 1.0:
        raise InvalidArgumentError(
            f"recall={recall!r} is outside (0, 1]: it is the fraction of each head's attention mass "
            "its pattern must keep, e.g. recall=0.95 (1.0 keeps every head dense-equivalent)")
    return float(recall)


def check_patterns(patterns: Any) -> tuple[str, ...] | None:
    """``patterns`` as a tuple of registered family names (None: every family), or
    :class:`InvalidArgumentError` naming the known ones."""
    if patterns is None:
        return None
    from sparsec.patterns import pattern_kinds

    names = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    unknown = [name for name in names if name not in pattern_kinds()]
    if unknown or not names:
        what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no family named"
        raise InvalidArgumentError(f"patterns={list(names)!r}: {what}; name families among "
                                   f"{', '.join(pattern_kinds())}, or leave it None for every one")
    return names


def check_finite(calls: list[tuple[tuple, dict]], what: str = "calibration batch") -> None:
    """Raise :class:`InvalidArgumentError` naming the batch and input of the first
    floating-point tensor that holds NaN or infinity (the statistics and the reference
    output would be NaN, and every head would be judged on garbage). ``what`` names the
    calls: ``"calibration batch"`` (numbered) or ``"example_inputs"`` (one call)."""
    for index, (args, kwargs) in enumerate(calls):
        for group, container in (("positional", args), ("keyword", kwargs)):
            leaves, _spec = pytree.tree_flatten_with_path(container)
            for path, leaf in leaves:
                if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
                    where = what if len(calls) == 1 and what == "example_inputs" else f"{what} {index}"
                    raise InvalidArgumentError(
                        f"{where}: {group} input {pytree.keystr(path)} is on the meta device, which holds "
                        "shapes but no data; pass real tensors (on cpu or cuda), since sparsec runs the "
                        "model to measure its attention")
                if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                    continue
                finite = torch.isfinite(leaf)
                if bool(finite.all()):
                    continue
                kind = "NaN" if bool(torch.isnan(leaf).any()) else "infinity"
                where = what if len(calls) == 1 and what == "example_inputs" else f"{what} {index}"
                raise InvalidArgumentError(
                    f"{where}: {group} input {pytree.keystr(path)} holds {kind} "
                    f"({int((~finite).sum())} of {leaf.numel()} values are not finite); pass finite "
                    "inputs (check the data pipeline and the padding values)")


def relative_l2(reference: Any, candidate: Any) -> float:
    """‖candidate − reference‖ / ‖reference‖ over every floating-point tensor of two outputs."""
    ref_leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out_leaves = [t for t in pytree.tree_leaves(candidate) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    num = sum(_squared_norm(r, o) for r, o in zip(ref_leaves, out_leaves))
    den = sum(_squared_norm(r) for r in ref_leaves)
    return (num / max(den, 1e-30)) ** 0.5


def _squared_norm(a: torch.Tensor, b: torch.Tensor | None = None, step: int = 1 << 16) -> float:
    """``||a||²``, or ``||b - a||²``: fp32 (float64 for float64) dot products of ``step``-value slices (relative
    error ~3e-8 on SmolLM2-sized logits) summed in float64. No float64 copy and no whole
    difference tensor: on SmolLM2's 2k x 49k logits those took 1.9 s of a CPU compile, a
    float64 norm of each slice 1.1 s, this 0.06 s."""
    if b is not None:
        a, b = torch.broadcast_tensors(a, b)
        b = b.reshape(-1)
    a = a.reshape(-1)
    dtype = torch.promote_types(a.dtype, torch.float32)      # float64 stays float64
    total = 0.0
    for i in range(0, a.numel(), step):
        part = a[i:i + step].to(dtype)
        if b is not None:
            part = b[i:i + step].to(dtype) - part
        total += float(torch.dot(part, part))
    return total
