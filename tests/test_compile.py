"""sparsec.compile end to end with an explicit pass list: API, save/load, errors."""
import json
import warnings

import pytest
import torch

import sparsec
from sparsec.ir.errors import (ArtifactCorruptError, ArtifactMissingError, ArtifactVersionError,
                            CalibrationMismatchError, CaptureError, NoAttentionError,
                            UnservableInputError, UnsupportedDtypeError)
from sparsec.passes.canonicalize import Canonicalize
from sparsec.testing.plant_patterns import PlantPatterns
from sparsec.passes.lower import Lower
from sparsec.ir.plan import HeadGroup
from sparsec.ir import reference


class TinyAttention(torch.nn.Module):
    """Four heads, two KV heads, canonical attention called directly."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def project(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x):
        q, k, v = self.project(x)
        y = torch.ops.sparsec.attention(q, k, v, None, self.head_dim ** -0.5, True)
        return self.o(y.transpose(1, 2).reshape(x.shape))


PATTERNS = {1: ("window", {"window": [5, 0]}), 2: ("sink_window", {"sink": [2, 0], "window": [4, 0]})}


def compile_tiny(model, x, patterns=PATTERNS, **kwargs):
    return sparsec.compile(model, (x,), passes=[Canonicalize(), PlantPatterns([patterns]), Lower()], **kwargs)


def expected_sparse(model, x, patterns):
    q, k, v = model.project(x)
    heads = {h: patterns.get(h, ("dense", {})) for h in range(model.heads)}
    table = {}
    for h, (kind, params) in heads.items():
        table.setdefault((kind, json.dumps(params)), []).append(h)
    group_list = [HeadGroup(kind, json.loads(params), hs) for (kind, params), hs in table.items()]
    y = reference.sparse_attention(q, k, v, None, model.head_dim ** -0.5, True, group_list)
    return model.o(y.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("batch,length", [(1, 24), (3, 37)])
def test_compiled_equals_reference_sparse_computation(batch, length):
    torch.manual_seed(batch * 100 + length)
    model = TinyAttention().eval()
    cm = compile_tiny(model, torch.randn(2, 20, 32))
    x = torch.randn(batch, length, 32)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), expected_sparse(model, x, PATTERNS), rtol=1e-5, atol=1e-5)
    assert cm.plan.attention[0].extra["lowered"].startswith("sparse_attention")


def test_a_dynamic_block_layout_compiles_saves_and_serves_other_lengths(tmp_path):
    """dynamic_blocks planted beside a static head: the compiled model, and the same artifact
    loaded, equal the reference's sparse computation (the layout estimated per call) at
    lengths other than the example's."""
    torch.manual_seed(5)
    model = TinyAttention().eval()
    patterns = {0: ("dynamic_blocks", {"block": 8, "samples": 3, "share": 0.8, "density": [0.4, 64, 0.3]}),
                2: ("sink_window", {"sink": [2, 0], "window": [4, 0]})}
    cm = compile_tiny(model, torch.randn(2, 20, 32), patterns)
    cm.save(tmp_path / "artifact")
    loaded = sparsec.load(tmp_path / "artifact")
    for batch, length in [(1, 45), (3, 70)]:
        x = torch.randn(batch, length, 32)
        with torch.no_grad():
            expected = expected_sparse(model, x, patterns)
            torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
            assert (expected - model(x)).abs().max() > 1e-3          # the layout dropped some blocks


def test_compiled_graph_composes_with_torch_compile():
    """Inductor compiles the rest of sparsec's graph around the opaque sparse_attention op."""
    torch.manual_seed(1)
    model = TinyAttention().eval()
    cm = compile_tiny(model, torch.randn(2, 20, 32))
    x = torch.randn(2, 29, 32)
    with torch.no_grad():
        fast = torch.compile(cm.graph_module, dynamic=False)
        torch.testing.assert_close(fast(x), expected_sparse(model, x, PATTERNS), rtol=1e-4, atol=1e-4)


def test_all_dense_equals_original_model():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    cm = compile_tiny(model, torch.randn(2, 20, 32), patterns={})
    x = torch.randn(2, 33, 32)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)
    assert cm.plan.error["rel_l2_vs_dense_on_example"] < 1e-6


def test_save_load_round_trip_and_other_length(tmp_path):
    torch.manual_seed(1)
    model = TinyAttention().eval()
    cm = compile_tiny(model, torch.randn(2, 20, 32))
    cm.save(tmp_path / "artifact")
    loaded = sparsec.load(tmp_path / "artifact")
    x = torch.randn(2, 45, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cm(x))
    assert loaded.plan.to_dict() == cm.plan.to_dict()


def test_dumps_written(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_DUMP", str(tmp_path / "dump"))
    compile_tiny(TinyAttention().eval(), torch.randn(1, 16, 32))
    names = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert "001_canonicalize.py" in names and "003_lower.json" in names and "plan.json" in names
    header = (tmp_path / "dump" / "003_lower.py").read_text().splitlines()[0]
    assert "lower" in header
    record = json.loads((tmp_path / "dump" / "003_lower.json").read_text())
    assert record["modified"] is True


def test_gpu_target_runs_reference_on_cpu_with_one_warning():
    model = TinyAttention().eval()
    cm = compile_tiny(model, torch.randn(1, 16, 32), target="h100")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm(torch.randn(1, 16, 32))
        cm(torch.randn(1, 16, 32))
    messages = [str(w.message) for w in caught if "reference kernels" in str(w.message)]
    assert len(messages) == 1 and "h100" in messages[0]


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum().item() > 0:      # data-dependent Python control flow: not capturable
            return x * 2
        return x


def test_capture_error_quotes_reason():
    with pytest.raises(CaptureError) as info:
        sparsec.compile(DataDependent(), (torch.randn(2, 3),))
    assert "Underlying reason" in str(info.value) and info.value.reason


def test_no_attention_error():
    with pytest.raises(NoAttentionError, match="no attention"):
        sparsec.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), passes=[Canonicalize()])


def test_calibration_mismatch_errors():
    model = TinyAttention().eval()
    x = torch.randn(1, 16, 32)
    with pytest.raises(CalibrationMismatchError, match="structure"):
        compile_tiny(model, x, calibration=[{"x": x}])
    with pytest.raises(CalibrationMismatchError, match="dtype"):
        compile_tiny(model, x, calibration=[(x.double(),)])
    with pytest.raises(CalibrationMismatchError, match="empty"):
        compile_tiny(model, x, calibration=[])


def test_unsupported_dtype_error():
    model = TinyAttention().double().eval()
    with pytest.raises(UnsupportedDtypeError, match="float64"):
        compile_tiny(model, torch.randn(1, 16, 32, dtype=torch.float64))


def test_unservable_input_errors():
    cm = compile_tiny(TinyAttention().eval(), torch.randn(1, 16, 32))
    with pytest.raises(UnservableInputError, match="structure"):
        cm(torch.randn(1, 16, 32), torch.randn(1))
    with pytest.raises(UnservableInputError, match="dtype"):
        cm(torch.randn(1, 16, 32, dtype=torch.float64))
    with pytest.raises(UnservableInputError, match="at least 2"):
        cm(torch.randn(3, 16, 32))          # the example's batch of 1 was specialised by export


def test_artifact_errors(tmp_path):
    with pytest.raises(ArtifactMissingError):
        sparsec.load(tmp_path / "nothing")
    cm = compile_tiny(TinyAttention().eval(), torch.randn(1, 16, 32))
    path = cm.save(tmp_path / "a")
    plan_file = path / "plan.json"
    plan_file.write_text(plan_file.read_text().replace('"window"', '"dense"'))
    with pytest.raises(ArtifactCorruptError, match="sha256"):
        sparsec.load(path)
    path = cm.save(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 999
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactVersionError, match="format 999"):
        sparsec.load(path)
    path = cm.save(tmp_path / "c")
    (path / "program.pt2").unlink()
    with pytest.raises(ArtifactMissingError, match="program.pt2"):
        sparsec.load(path)


def test_plan_version_mismatch_rejected():
    data = compile_tiny(TinyAttention().eval(), torch.randn(1, 16, 32)).plan.to_dict()
    data["version"] = 0
    with pytest.raises(ArtifactVersionError, match="plan version 0"):
        sparsec.Plan.from_dict(data)


def test_recompile_with_edited_plan():
    torch.manual_seed(3)
    model = TinyAttention().eval()
    plan = compile_tiny(model, torch.randn(1, 16, 32)).plan
    plan.attention[0].heads[2].assign("dense", {}, "edited by the test")
    cm = sparsec.compile(model, (torch.randn(2, 16, 32),), plan=plan)
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), expected_sparse(model, x, {1: PATTERNS[1]}), rtol=1e-5, atol=1e-5)


def test_reference_accepts_three_dimensional_per_head_mask():
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.rand(4, 9, 9) > 0.3
    mask[..., 0] = True
    groups = [HeadGroup("dense", {}, [0, 2]), HeadGroup("window", {"window": [3, 0]}, [1, 3])]
    out = reference.sparse_attention(q, k, v, mask, 0.3, False, groups)
    dense = reference.dense_attention(q, k, v, mask, 0.3, False)
    torch.testing.assert_close(out[:, [0, 2]], dense[:, [0, 2]])


def test_disable_passes_skips_a_pass_by_name():
    torch.manual_seed(5)
    model = TinyAttention().eval()
    x = torch.randn(2, 20, 32)
    cm = compile_tiny(model, x, disable_passes=["lower"])
    assert cm.plan.extra["disabled_passes"] == ["lower"]
    targets = {n.target for n in cm.graph_module.graph.nodes}
    assert torch.ops.sparsec.sparse_attention.default not in targets     # planned, never lowered
    assert [h.pattern for h in cm.plan.attention[0].heads] == ["dense", "window", "sink_window", "dense"]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot disable"):
        compile_tiny(model, x, disable_passes=["no_such_pass"])


def test_instruments_see_every_pass_of_a_compile():
    from sparsec.passes.infra.pass_manager import PassTimer
    timer = PassTimer()
    compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32), instruments=[timer])
    assert list(timer.seconds) == ["canonicalize", "plant_patterns", "lower"]
    assert all(seconds > 0 for seconds in timer.seconds.values())
