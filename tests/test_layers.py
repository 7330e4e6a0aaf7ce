"""The package layers, checked from the source: every import (at module level or inside a
function) goes to the same layer or a lower one, module-level imports form no cycle, and
``import sparsec`` stays light (no Triton, no ONNX, no transformers).

Layers, lowest first — the rule docs/design.md states:

    ir        sparsec.ir, sparsec.patterns, sparsec.weights   (plan, ops, patterns, errors, config)
    analysis  sparsec.analysis                                (cost model, knapsack, graph runner)
    passes    sparsec.passes
    lowering  sparsec.codegen, sparsec.runtime
    tools     sparsec (front door), sparsec.compiler, sparsec.generation, sparsec.tools, sparsec.testing
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ("ir", ("sparsec.ir", "sparsec.patterns", "sparsec.weights")),
    ("analysis", ("sparsec.analysis",)),
    ("passes", ("sparsec.passes",)),
    ("lowering", ("sparsec.codegen", "sparsec.runtime")),
    ("tools", ("sparsec.tools", "sparsec.testing", "sparsec.compiler", "sparsec.generation", "sparsec.__main__",
               "sparsec")),
]


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[0]


def package_modules() -> dict[str, Path]:
    """Module name -> source file, following pyproject's package-dir map."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = setup.get("package-dir", {"sparsec": "sparsec"})
    modules = {}
    for package in setup["packages"]:
        base = max((p for p in roots if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / roots[base] / Path(*package[len(base):].strip(".").split(".") if package != base else ())
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """(imported sparsec module, run at import time?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = set()       # run at import time (an `if TYPE_CHECKING:` block does not)
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else (node,):
            top_level.add(id(inner))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in top_level) for t in targets if t == "sparsec" or t.startswith("sparsec.")]
    return found


def test_imports_go_down_the_layers():
    modules = package_modules()
    wrong = []
    for name, path in sorted(modules.items()):
        for target, _ in imports_of(name, path, modules):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_module_imports_have_no_cycle():
    modules = package_modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        for target, top in imports_of(name, path, modules):
            if top and target != name and target in modules:
                graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize("heavy", ["triton", "onnx", "onnxruntime", "transformers", "matplotlib"])
def test_import_sparsec_stays_light(heavy):
    code = f"import sys, sparsec; print({heavy!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", f"import sparsec imports {heavy}"
