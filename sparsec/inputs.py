"""Normalising and checking model inputs: example, calibration and serving calls."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils import _pytree as pytree

from .errors import CalibrationMismatchError


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
    return calls


def relative_l2(reference: Any, candidate: Any) -> float:
    """‖candidate − reference‖ / ‖reference‖ over every floating-point tensor of two outputs."""
    ref_leaves = [t for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out_leaves = [t for t in pytree.tree_leaves(candidate) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    num = sum(float((o.double() - r.double()).pow(2).sum()) for r, o in zip(ref_leaves, out_leaves))
    den = sum(float(r.double().pow(2).sum()) for r in ref_leaves)
    return (num / max(den, 1e-30)) ** 0.5
