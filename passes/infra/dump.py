"""Pass dumps: ``NNN_<pass>.py`` (the graph as code, with a header) and ``NNN_<pass>.json``
(what the pass decided), numbered in run order, plus ``plan.json`` and ``plan.txt``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.fx

from sparsec.ir.plan import Plan


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class DumpWriter:
    def __init__(self, directory: "str | Path"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.counter = 0

    def write_graph(self, pass_name: str, gm: torch.fx.GraphModule, seconds: float,
                    modified: bool, decisions: Any) -> None:
        stem = f"{self.counter:03d}_{pass_name}"
        self.counter += 1
        header = (f"# Constructed by sparsec pass '{pass_name}'\n"
                  f"# time: {seconds:.3f} s, graph changed: {modified}\n"
                  f"# nodes: {len(gm.graph.nodes)}\n")
        (self.directory / f"{stem}.py").write_text(header + gm.code)
        record = {"pass": pass_name, "seconds": seconds, "modified": modified,
                  "decisions": _jsonable(decisions)}
        (self.directory / f"{stem}.json").write_text(json.dumps(record, indent=1))

    def write_plan(self, plan: Plan) -> None:
        (self.directory / "plan.json").write_text(plan.to_json())
        (self.directory / "plan.txt").write_text(plan.summary() + "\n")
