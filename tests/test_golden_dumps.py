"""Golden dumps: what the passes decide for two small models, compared with stored copies.

Like tinygrad's process replay: a refactor that changes a plan (a pattern, a parameter, a
group, a head permutation, a densified head) or a pass's effect on the graph shows up here
as a diff. Intended changes are recorded with

    python -m pytest tests/test_golden_dumps.py --update-golden

and the new goldens reviewed with the change. Stored per model under ``tests/golden/<name>/``:
``plan.json`` (``plan.to_dict()`` with floats at 4 significant digits and export's shape
symbols renamed in order) and ``dumps.txt`` (the dump's file names in run order and each
graph dump's header, wall-clock time stripped).
"""
from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.testing.planted import PlantedAttention, planted_llama, planted_llama_inputs

GOLDEN = Path(__file__).parent / "golden"
SIGNIFICANT_DIGITS = 4
SERVING_LENGTH = 4096
REL_TOLERANCE, ABS_TOLERANCE = 1e-3, 1e-6      # for floats that flip with the thread count


# layer -> {query head: (kind, window)}: a pattern on each kv head, interleaved across heads.
LLAMA_PLANT = {0: {0: ("window", 16), 2: ("sink_window", 16)},
               1: {1: ("window", 32), 2: ("vertical_stripe", 16), 3: ("sink_window", 32)}}


def _llama_decoder():
    """The README's planted causal decoder (RoPE, GQA, sdpa), cut to 2 layers of 4 heads at N = 512."""
    model = planted_llama(layers=2, heads=4, kv_heads=2, hidden=128, intermediate=256, vocab=256,
                          plant=LLAMA_PLANT, seed=0)
    example = (planted_llama_inputs(batch=2, length=512, vocab=256, seed=0),)
    calibration = [(planted_llama_inputs(batch=2, length=512, vocab=256, seed=1),)]
    return model, example, calibration


# Two non-causal layers whose heads interleave families, so fusion has heads to reorder.
ENCODER_LAYERS = [
    [("window", {"window": 8}), ("block_topk", {"block": 16, "density": 0.3}),
     ("window", {"window": 8}), ("dense", {})],
    [("sink_window", {"sink": 2, "window": 6}), ("multi_diagonal", {"period": 16, "width": 3}),
     ("vertical_stripe", {"columns": [5, 40], "window": 6}), ("sink_window", {"sink": 2, "window": 6})],
]


def _planted_encoder():
    """A non-causal planted-attention encoder through ``F.scaled_dot_product_attention``."""
    model = PlantedAttention(ENCODER_LAYERS, causal=False, attention="sdpa", seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 256, 32, generator=generator),)
    calibration = [(torch.randn(2, 256, 32, generator=generator),)]
    return model, example, calibration


MODELS = {"planted_llama": _llama_decoder, "planted_encoder": _planted_encoder}


def _round(value):
    """Floats to a few significant digits, recursively (ints, strings and bools kept)."""
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {key: _round(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_round(item) for item in value]
    return value


def _rename_symbols(text: str) -> str:
    """Export's shape symbols (``s72``) depend on the torch version: number them in order."""
    names: dict[str, str] = {}
    return re.sub(r"\bs\d+\b", lambda m: names.setdefault(m.group(0), f"sym{len(names)}"), text)


def normalised_plan(plan) -> str:
    return _rename_symbols(json.dumps(_round(plan.to_dict()), indent=1, sort_keys=True)) + "\n"


def dump_headers(directory: Path) -> str:
    """File names in run order; under each graph dump, its header without the time."""
    lines = []
    for path in sorted(directory.iterdir()):
        lines.append(path.name)
        if path.suffix == ".py":
            header = [line for line in path.read_text().splitlines()[:3] if line.startswith("# ")]
            lines += ["    " + re.sub(r"time: [0-9.]+ s, ", "", line) for line in header]
    return "\n".join(lines) + "\n"


def _close(expected, actual) -> bool:
    """Same structure and strings; floats within REL_TOLERANCE."""
    if isinstance(expected, float) or isinstance(actual, float):
        return (isinstance(expected, (int, float)) and isinstance(actual, (int, float))
                and not isinstance(expected, bool) and not isinstance(actual, bool)
                and math.isclose(expected, actual, rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE))
    if isinstance(expected, dict):
        return (isinstance(actual, dict) and expected.keys() == actual.keys()
                and all(_close(expected[key], actual[key]) for key in expected))
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(expected) == len(actual)
                and all(_close(e, a) for e, a in zip(expected, actual)))
    return type(expected) is type(actual) and expected == actual


def _diff(expected: str, actual: str, name: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                        f"golden/{name}", f"today/{name}"))


def _check(path: Path, actual: str, update: bool, tolerant: bool = False) -> None:
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    assert path.exists(), f"no golden {path}: run pytest {__file__} --update-golden"
    expected = path.read_text()
    if expected == actual or (tolerant and _close(json.loads(expected), json.loads(actual))):
        return
    pytest.fail(f"{path.relative_to(GOLDEN.parent)} changed (if intended: --update-golden):\n"
                + _diff(expected, actual, f"{path.parent.name}/{path.name}"), pytrace=False)


# Costed at a serving length where sparse patterns pay off (so the plan has sparse groups to
# fuse), verified at the calibration length only: compile warns that the plan is unverified.
@pytest.mark.filterwarnings("ignore:sparsec. the plan is costed")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_dump(name, tmp_path, request, monkeypatch):
    monkeypatch.delenv("SPARSEC_DUMP", raising=False)
    torch.manual_seed(0)
    model, example, calibration = MODELS[name]()
    cm = sparsec.compile(model, example, calibration=calibration, target="cpu", recall=0.95,
                         seq_len=SERVING_LENGTH, dump_dir=tmp_path / "dump")
    update = request.config.getoption("--update-golden")
    _check(GOLDEN / name / "plan.json", normalised_plan(cm.plan), update, tolerant=True)
    _check(GOLDEN / name / "dumps.txt", dump_headers(tmp_path / "dump"), update)
