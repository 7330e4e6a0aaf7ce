"""The measurements sparsec ships (``sparsec/data/*.json``): the cost model's tables are
fitted to these files and read from them, never copied into code.

- ``attention_calibration_<target>.json``: ``sparsec bench cost-model`` runs; their ``fit``
  holds the attention rates of :mod:`sparsec.analysis.cost_model`.
- ``sparse_linear_<target>.json``: ``sparsec bench linear`` runs; their ``speedup`` table
  drives :mod:`sparsec.analysis.linear_costs`.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def _read(name: str) -> str | None:
    file = resources.files("sparsec").joinpath("data", f"{name}.json")
    return file.read_text() if file.is_file() else None


def packaged(kind: str, target: str) -> dict | None:
    """The shipped ``<kind>_<target>.json`` (e.g. ``packaged("sparse_linear", "h100")``), or None."""
    text = _read(f"{kind}_{target}")
    return None if text is None else json.loads(text)


def packaged_targets(kind: str) -> list[str]:
    """The targets with a shipped ``<kind>_<target>.json``."""
    prefix = f"{kind}_"
    return sorted(entry.name[len(prefix):-len(".json")] for entry in resources.files("sparsec").joinpath("data").iterdir()
                  if entry.name.startswith(prefix) and entry.name.endswith(".json"))
