"""capture: the model to an aten-level fx GraphModule with torch.export (non-strict).

Every dimension of every tensor input is exported as ``Dim.AUTO``, so sequence length
(and batch) stay symbolic where the model allows it and plans serve any length; where
dynamic export fails the model is captured with static shapes, and the plan says so.

The model is captured as it is served for inference: :func:`capture_mode` puts it in eval
mode and turns its key/value cache off for the duration (Hugging Face causal LMs default to
``config.use_cache=True`` and return a ``DynamicCache``, which is not a pytree type, so
``torch.export`` cannot return it; a prefill-only compiled model has no use for it). Both are
restored afterwards, so the user's model is left in the mode and config it came in. The
compiled model returns the same output structure (``out.logits``) without the cache.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from sparsec.ir.errors import CaptureError


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


@contextlib.contextmanager
def capture_mode(model: torch.nn.Module):
    """``model`` in eval mode with its KV cache off (``config.use_cache = False``, for models
    with a Hugging Face style config), restoring both on exit.

    The config is switched rather than ``use_cache=False`` passed to ``forward``: the call
    signature (and so the compiled model's) stays the user's, and models whose ``forward``
    has no ``use_cache`` argument but read the config (many HF models) are covered too.
    """
    modes = [(module, module.training) for module in model.modules()]     # mixed modes too
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    switch_cache = isinstance(use_cache, bool) and use_cache
    model.eval()
    if switch_cache:
        config.use_cache = False
    try:
        yield model
    finally:
        if switch_cache:
            config.use_cache = use_cache
        for module, training in modes:
            module.training = training


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, dict]:
    """Export ``model`` (under :func:`capture_mode`: eval, no KV cache) and return its unlifted
    GraphModule and a record for the plan; the model's mode and config are restored after."""
    with capture_mode(model):
        return _capture(model, args, kwargs)


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, dict]:
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
