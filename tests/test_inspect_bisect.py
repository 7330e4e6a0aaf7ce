"""`sparsec inspect` on a dump made here, head explanations, the bisect helper on a model
with a planted critical head, and the graded SPARSEC_DEBUG levels."""
import json
import logging

import pytest
import torch

import sparsec
from sparsec.compiler import default_passes
from sparsec.tools.bisect_plan import bisect, ddmin, make_dense
from sparsec.tools.cli import main
from sparsec.ir.inputs import relative_l2
from sparsec.passes.canonicalize import Canonicalize
from sparsec.testing.plant_patterns import PlantPatterns
from sparsec.passes.lower import Lower
from sparsec.ir.plan import AttentionSite, HeadPlan, Plan
from sparsec.ir.targets import Target, register_target
from sparsec.testing import planted_llama, planted_llama_inputs

WINDOW = ("window", {"window": [3, 0]})


class ResidualAttention(torch.nn.Module):
    """x + attention(x), each head's output scaled by ``head_scale[h]`` (through o's columns)."""

    def __init__(self, dim, head_scale):
        super().__init__()
        self.heads, self.head_dim = len(head_scale), dim // len(head_scale)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.o = torch.nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.o.weight.view(dim, self.heads, self.head_dim).mul_(torch.tensor(head_scale)[None, :, None])

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = torch.ops.sparsec.attention(q, k, v, None, self.head_dim ** -0.5, True)
        return x + self.o(y.transpose(1, 2).reshape(x.shape))


class Stack(torch.nn.Module):
    def __init__(self, scales, dim=32):
        super().__init__()
        self.layers = torch.nn.ModuleList(ResidualAttention(dim, s) for s in scales)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def planted_stack(layers=4, heads=4, critical=((2, 1),), seed=0):
    """Every head nearly silent (output scale 0.02) except the critical (layer, head)s (scale 3)."""
    torch.manual_seed(seed)
    scales = [[0.02] * heads for _ in range(layers)]
    for layer, head in critical:
        scales[layer][head] = 3.0
    return Stack(scales).eval(), (torch.randn(2, 48, 32),)


def compile_planted(model, inputs, **kwargs):
    return sparsec.compile(model, inputs, passes=[Canonicalize(), PlantPatterns([], default=WINDOW), Lower()], **kwargs)


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dump")
    model, inputs = planted_stack(layers=2, heads=2, critical=[(1, 0)])
    compile_planted(model, inputs, dump_dir=directory)
    return directory


# -- inspect --

def test_inspect_lists_passes_with_time_and_change(dump, capsys):
    assert main(["inspect", str(dump)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line for line in out[1:] if line.split()[0].isdigit()}
    assert list(rows) == ["input", "canonicalize", "plant_patterns", "lower"]
    for name, line in rows.items():
        record = json.loads(next(dump.glob(f"*_{name}.json")).read_text())
        assert line.split()[-1] == ("changed" if record["modified"] else "unchanged")
        assert f"{record['seconds']:.3f}s" in line
    assert out[-1].split()[0] == "total"


def test_inspect_graph_decisions_diff_and_plan(dump, capsys):
    assert main(["inspect", str(dump), "--graph", "lower"]) == 0
    graph = capsys.readouterr().out
    assert "sparse_attention" in graph and "# Constructed" not in graph and "def forward" in graph

    assert main(["inspect", str(dump), "--decisions", "3"]) == 0
    decisions = json.loads(capsys.readouterr().out)
    assert decisions == {"layers.0": ["window:[0, 1]@cpu"], "layers.1": ["window:[0, 1]@cpu"]}

    assert main(["inspect", str(dump), "--diff", "canonicalize", "003_lower"]) == 0
    diff = capsys.readouterr().out
    assert "--- 001_canonicalize.py" in diff and "+++ 003_lower.py" in diff
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert any("sparse_attention" in line for line in added)
    assert any("sparsec.attention" in line for line in removed)
    assert main(["inspect", str(dump), "--diff", "canonicalize", "plant_patterns"]) == 0
    assert "same graph" in capsys.readouterr().out

    assert main(["inspect", str(dump), "--plan"]) == 0
    summary = capsys.readouterr().out
    assert summary.count(" window ") == 4 and "measured error" in summary


def test_inspect_errors_name_the_fix(dump, tmp_path, capsys):
    assert main(["inspect", str(dump), "--graph", "classify_heads"]) == 2
    err = capsys.readouterr().err
    assert "no pass 'classify_heads'" in err and "003_lower" in err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["inspect", str(dump), "--head", "7.0"]) == 2
    assert "no attention site at layer 7" in capsys.readouterr().err
    assert main(["inspect", str(dump), "--head", "1"]) == 2
    assert "LAYER.HEAD" in capsys.readouterr().err


def _classified_plan() -> Plan:
    candidates = [
        {"pattern": "window", "params": {"window": [16, 0]}, "recall": 0.81, "density": 0.12},
        {"pattern": "sink_window", "params": {"sink": [4, 0], "window": [32, 0]}, "recall": 0.97, "density": 0.25},
        {"pattern": "vertical_stripe", "params": {"columns": [0, 7], "window": [64, 0]}, "recall": 0.98,
         "density": 0.40},
        {"pattern": "dense", "params": {}, "recall": 1.0, "density": 1.0},
    ]
    won = HeadPlan(0, "sink_window", {"sink": [4, 0], "window": [32, 0]}, 0.97, 0.25, candidates)
    dense = HeadPlan(1, "dense", {}, 1.0, 1.0, [dict(c, recall=c["recall"] * 0.92) if c["pattern"] != "dense"
                                                else c for c in candidates],
                     reason="no candidate reached recall 0.95")
    bare = HeadPlan(2, "window", {"window": [8, 0]})
    site = AttentionSite("model.layers.3.self_attn", 3, 3, 1, 16, True, [won, dense, bare])
    return Plan(target="cpu", recall_threshold=0.95, attention=[site])


def test_inspect_head_explains_the_choice(tmp_path, capsys):
    (tmp_path / "plan.json").write_text(_classified_plan().to_json())

    assert main(["inspect", str(tmp_path), "--head", "3.0"]) == 0
    out = capsys.readouterr().out
    assert "recall threshold: 0.95" in out
    rows = [line for line in out.splitlines() if line.startswith("  ") and "verdict" not in line]
    assert [row.split()[0 if not row.startswith("  *") else 1] for row in rows] == \
        ["window", "sink_window", "vertical_stripe", "dense"]        # cheapest first
    assert rows[1].startswith("  *") and rows[1].endswith("chosen")
    assert rows[0].endswith("recall 0.810 < threshold 0.95")
    assert rows[2].endswith("meets the threshold, costlier than the chosen")
    assert "sink_window won: the cheapest candidate whose recall (0.970) meets the recall threshold 0.95" in out

    assert main(["inspect", str(tmp_path), "--head", "model.layers.3.self_attn.1"]) == 0
    out = capsys.readouterr().out
    assert ("stayed dense: no sparse candidate reached the recall threshold 0.95 "
            "(best: vertical_stripe at recall 0.902)") in out
    assert "(no candidate reached recall 0.95)" in out

    assert main(["inspect", str(tmp_path), "--head", "3.2"]) == 0
    assert "no candidates recorded" in capsys.readouterr().out


def test_inspect_head_on_a_classified_planted_llama(tmp_path, capsys):
    """The default pipeline on the example model: a planted window head wins with a sparse
    pattern, a random head stays dense, and both explanations say against what threshold."""
    tiny_blocks = register_target(Target("inspect-test", "cpu", "cpu", peak_tflops=0.2, bandwidth_gbs=20.0,
                                         launch_overhead_us=5.0, block_m=8, block_n=8))
    model = planted_llama(layers=1, heads=4, kv_heads=2, hidden=128, intermediate=128, vocab=64,
                          plant={0: {0: ("window", 8)}})
    cm = sparsec.compile(model, (planted_llama_inputs(2, 96, vocab=64),), target=tiny_blocks,
                         passes=default_passes(), dump_dir=tmp_path / "dump")   # classification as decided
    site = cm.plan.attention[0]
    planted = next(h for h in range(4) if site.head_permutation()[h] == 0)
    assert main(["inspect", str(tmp_path / "dump"), "--head", f"0.{planted}"]) == 0
    out = capsys.readouterr().out
    chosen = site.heads[planted]
    assert chosen.pattern != "dense" and "recall threshold: 0.95" in out
    marked = [line for line in out.splitlines() if line.startswith("  * ")]
    assert len(marked) == 1 and marked[0].split()[1] == chosen.pattern and marked[0].endswith("chosen")
    assert f"why: {chosen.pattern} won: the cheapest candidate whose recall" in out
    dense = next(h.head for h in site.heads if h.pattern == "dense")
    assert main(["inspect", str(tmp_path / "dump"), "--head", f"0.{dense}"]) == 0
    out = capsys.readouterr().out
    assert "why: stayed dense" in out and "recall threshold 0.95" in out


# -- bisect --

def test_ddmin_finds_a_one_minimal_failing_subset():
    calls = []

    def fails(units):
        calls.append(tuple(units))
        return {3, 11} <= set(units)

    assert ddmin(list(range(16)), fails) == [3, 11]
    assert ddmin([5], fails) == [5]
    # A threshold on a sum: the result fails, and every one-smaller subset passes.
    weights = {0: 0.1, 1: 0.6, 2: 0.05, 3: 0.5, 4: 0.3, 5: 0.2}
    over = lambda units: sum(weights[u] for u in units) > 1.0  # noqa: E731
    found = ddmin(list(weights), over)
    assert over(found) and not any(over([u for u in found if u != drop]) for drop in found)


def test_make_dense_copies_and_regroups():
    plan = _classified_plan()
    edited = make_dense(plan, [("model.layers.3.self_attn", 0)])
    assert edited.attention[0].heads[0].pattern == "dense" and plan.attention[0].heads[0].pattern == "sink_window"
    assert [(g.pattern, g.heads) for g in edited.attention[0].groups] == [("dense", [0, 1]), ("window", [2])]


def test_bisect_finds_the_planted_critical_head():
    model, inputs = planted_stack(layers=4, heads=4, critical=[(2, 1)])
    plan = compile_planted(model, inputs).plan
    result = bisect(model, plan, inputs, threshold=0.05)
    assert result.full_error > 0.05
    assert result.sites == ["layers.2"]
    assert result.heads == [("layers.2", 1)]
    assert result.error > 0.05 and result.repaired_error < 0.05
    assert result.compiles <= 12
    assert "layers.2 head 1" in result.summary() and "still over" not in result.summary()


def test_bisect_with_two_critical_heads_says_to_go_on():
    model, inputs = planted_stack(layers=2, heads=2, critical=[(0, 0), (1, 1)], seed=3)
    plan = compile_planted(model, inputs).plan
    with torch.no_grad():
        dense = model(*inputs)
        # The error with each critical head's layer sparse but the other critical head dense.
        alone = [relative_l2(dense, sparsec.compile(model, inputs, plan=make_dense(plan, [other]))(*inputs))
                 for other in [("layers.1", 1), ("layers.0", 0)]]
    threshold = 0.5 * min(alone)
    result = bisect(model, plan, inputs, threshold=threshold)
    assert len(result.heads) == 1 and result.heads[0] in [("layers.0", 0), ("layers.1", 1)]
    assert result.repaired_error > threshold and "still over the threshold" in result.summary()


def test_bisect_with_a_custom_metric_and_a_plan_within_threshold():
    model, inputs = planted_stack(layers=2, heads=2, critical=[(0, 1)], seed=1)
    plan = compile_planted(model, inputs).plan
    seen = []

    def max_abs(reference, output):
        seen.append(output.shape)
        return float((reference - output).abs().max())

    result = bisect(model, plan, inputs, metric=max_abs, threshold=1e6)
    assert result.heads == [] and result.compiles == 1 and seen == [inputs[0].shape]
    assert "within the threshold" in result.summary()


FACTORY = '''
from test_inspect_bisect import planted_stack

def build():
    return planted_stack(layers=2, heads=2, critical=[(1, 1)], seed=2)
'''


def test_bisect_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "bisect_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, inputs = planted_stack(layers=2, heads=2, critical=[(1, 1)], seed=2)
    dump = tmp_path / "dump"
    compile_planted(model, inputs, dump_dir=dump)
    assert main(["bisect", "bisect_factory:build", str(dump), "--threshold", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "culprit layers: layers.1" in out and "layers.1 head 1" in out


# -- SPARSEC_DEBUG --

@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_debug_levels(level, monkeypatch, caplog):
    monkeypatch.setenv("SPARSEC_DEBUG", str(level))
    caplog.set_level(logging.INFO, logger="sparsec")
    model, inputs = planted_stack(layers=1, heads=2, critical=[(0, 0)])
    compile_planted(model, inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == "sparsec"]
    timing = [m for m in messages if m.split()[:1] in (["canonicalize"], ["plant_patterns"], ["lower"])]
    stats = [m for m in messages if m.lstrip().startswith("stats:")]
    graphs = [m for m in messages if "def forward" in m]
    assert len(timing) == (3 if level >= 1 else 0)
    if level >= 1:
        assert timing[-1].split()[-1] == "changed" and timing[-1].split()[1].endswith("s")
    assert len(stats) == (3 if level >= 2 else 0)
    if level >= 2:
        assert "sites_lowered_sparse" in stats[-1]
    # Level 3 prints the graph after each pass that changed it (lower, here).
    assert len(graphs) == (1 if level >= 3 else 0)
    if level >= 3:
        assert "sparse_attention" in graphs[0]


def test_debug_level_must_be_an_integer(monkeypatch):
    monkeypatch.setenv("SPARSEC_DEBUG", "verbose")
    with pytest.raises(ValueError, match="SPARSEC_DEBUG='verbose'"):
        compile_planted(*planted_stack(layers=1, heads=2, critical=[(0, 0)]))
