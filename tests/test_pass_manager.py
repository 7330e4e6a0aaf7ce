"""The pass manager owns the instruments: disabling passes by name, linting and recompiling
a modified graph, timing, dumping and extra instruments, in a fixed order."""
from __future__ import annotations

import json

import pytest
import torch

from sparsec.passes.infra.dump import DumpWriter
from sparsec.passes.infra.pass_manager import CompileContext, PassManager, PassResult
from sparsec.ir.plan import Plan
from sparsec.ir.targets import get_target


class _Small(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 3


class _ReluToSigmoid:
    """Rewrites relu to sigmoid and leaves recompiling to the manager."""

    name = "relu_to_sigmoid"

    def run(self, gm, ctx):
        changed = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.sigmoid
                changed += 1
        return PassResult(gm, changed > 0, {"rewritten": changed})


class _Counting:
    name = "counting"

    def __init__(self):
        self.runs = 0

    def run(self, gm, ctx):
        self.runs += 1
        return PassResult(gm, False, {"runs": self.runs})


def _context() -> CompileContext:
    x = torch.randn(3, 5)
    return CompileContext(plan=Plan("cpu"), target=get_target("cpu"), example_args=(x,), example_kwargs={},
                          calibration=[((x,), {})])


def test_manager_recompiles_a_modified_graph():
    gm = torch.fx.symbolic_trace(_Small())
    x = torch.randn(4, 7)
    gm = PassManager([_ReluToSigmoid()]).run(gm, _context())
    assert "sigmoid" in gm.code
    torch.testing.assert_close(gm(x), torch.sigmoid(x) * 3)


def test_disabled_pass_does_not_run_and_the_plan_and_dump_say_so(tmp_path, monkeypatch):
    counting = _Counting()
    ctx = _context()
    gm = torch.fx.symbolic_trace(_Small())
    monkeypatch.setenv("SPARSEC_DISABLE_PASSES", " relu_to_sigmoid ,")
    gm = PassManager([_ReluToSigmoid(), counting], DumpWriter(tmp_path)).run(gm, ctx)
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), torch.relu(x) * 3)
    assert counting.runs == 1 and ctx.plan.extra["disabled_passes"] == ["relu_to_sigmoid"]
    assert ctx.pass_stats["relu_to_sigmoid"] == {"disabled": True}
    record = json.loads((tmp_path / "001_relu_to_sigmoid.json").read_text())
    assert "disabled" in record["decisions"]["skipped"] and record["modified"] is False
    assert (tmp_path / "002_counting.json").exists()
    monkeypatch.delenv("SPARSEC_DISABLE_PASSES")
    PassManager([_Counting()], disabled=("counting",)).run(gm, ctx)
    with pytest.raises(ValueError, match="cannot disable"):
        PassManager([_Counting()], disabled=("fuse_head",))


def test_instruments_run_in_order_after_the_manager_checked_and_dumped(tmp_path):
    events = []

    class Recorder:
        def before_pass(self, name, gm, ctx):
            events.append(("before", name, "sigmoid" in gm.code))

        def after_pass(self, name, result, seconds, ctx):
            dumped = sorted(p.name for p in tmp_path.glob(f"*_{name}.py"))
            events.append(("after", name, "sigmoid" in result.graph_module.code, bool(dumped), seconds >= 0))

    gm = torch.fx.symbolic_trace(_Small())
    PassManager([_Counting(), _ReluToSigmoid()], DumpWriter(tmp_path), instruments=(Recorder(),)).run(gm, _context())
    assert events == [("before", "counting", False), ("after", "counting", False, True, True),
                      ("before", "relu_to_sigmoid", False), ("after", "relu_to_sigmoid", True, True, True)]
