"""capture: the model to an aten-level fx GraphModule with torch.export (non-strict).

Every dimension of every tensor input is exported as ``Dim.AUTO``, so sequence length
(and batch) stay symbolic where the model allows it and plans serve any length; where
dynamic export fails the model is captured with static shapes, and the plan says so.
"""
from __future__ import annotations

import inspect

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from sparsec.errors import CaptureError


def _auto_dims(value):
    return pytree.tree_map(
        lambda leaf: {i: Dim.AUTO for i in range(leaf.dim())} if isinstance(leaf, torch.Tensor) else None,
        value)


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    shapes = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: _auto_dims(v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(_auto_dims(v) for v in value)
        else:
            shapes[name] = _auto_dims(value)
    return shapes


def export_program(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
                   ) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with every input dimension ``Dim.AUTO`` when ``dynamic``."""
    shapes = _dynamic_shapes(module, args, kwargs) if dynamic else None
    return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=shapes)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, dict]:
    """Export ``model`` and return its unlifted GraphModule and a record for the plan."""
    model = model.eval()
    try:
        program = export_program(model, args, kwargs)
        record = {"dynamic": True, "ranges": {str(s): str(r) for s, r in program.range_constraints.items()}}
    except Exception as dynamic_error:  # noqa: BLE001 — any failure: fall back to static
        try:
            program = export_program(model, args, kwargs, dynamic=False)
        except Exception as error:  # noqa: BLE001 — re-raised typed, with the reason
            raise CaptureError(f"{type(error).__name__}: {error}".strip()[:2000]) from error
        record = {"dynamic": False,
                  "reason": f"dynamic-shape export failed, captured at the example's shapes "
                            f"only: {type(dynamic_error).__name__}: {str(dynamic_error)[:300]}"}
    return program.module(), record
