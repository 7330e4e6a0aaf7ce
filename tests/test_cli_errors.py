"""The CLI prints one line per ordinary mistake (a traceback only with
SPARSEC_DEBUG), refuses what it cannot do, and ``python -m sparsec`` runs it."""
import os
import subprocess
import sys

import pytest
import torch

import sparsec
from sparsec.tools.cli import main
from sparsec.ir.errors import ArtifactMissingError


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("SPARSEC_DEBUG", raising=False)


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"sparsec {argv[0]}: error: ")
    assert "Traceback" not in captured.err and captured.out == ""
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_plan_of_a_missing_artifact_is_one_line_and_a_traceback_under_debug(capsys, tmp_path, monkeypatch):
    _one_line_error(capsys, ["plan", str(tmp_path / "missing")], "missing", "CompiledModel.save()")
    monkeypatch.setenv("SPARSEC_DEBUG", "1")
    with pytest.raises(ArtifactMissingError):
        main(["plan", str(tmp_path / "missing")])


def test_export_of_a_missing_artifact_is_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["export", str(tmp_path / "missing"), str(tmp_path / "m.onnx")], "missing")


def test_run_onnx_of_a_missing_file_is_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["run-onnx", str(tmp_path / "missing.onnx")], "missing.onnx")


def test_bisect_with_a_bad_factory_or_plan_is_one_line(capsys, tmp_path):
    (tmp_path / "plan.json").write_text(sparsec.Plan(target="cpu").to_json())
    _one_line_error(capsys, ["bisect", "no_such_module_14:build", str(tmp_path)], "no_such_module_14")
    _one_line_error(capsys, ["bisect", "not-a-factory", str(tmp_path)], "MODULE:FUNCTION")
    _one_line_error(capsys, ["bisect", "no_such_module_14:build", str(tmp_path / "missing")], "missing")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(b, n, 16))

    directory = tmp_path_factory.mktemp("artifact") / "tiny"
    sparsec.compile(Tiny().eval(), (torch.randn(2, 12, 16),), tolerance=None).save(directory)
    return directory


def test_export_refuses_an_unsupported_opset_in_one_line(capsys, artifact, tmp_path):
    line = _one_line_error(capsys, ["export", str(artifact), str(tmp_path / "m.onnx"), "--opset", "5"],
                           "opset 5", "18")
    assert "InvalidArgumentError" in line
    assert not (tmp_path / "m.onnx").exists()


def test_bisect_reads_an_artifacts_plan_through_its_checks(capsys, artifact, tmp_path):
    """A plan.json edited behind the manifest's back is refused, as by load (the factory is
    never reached)."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(artifact, edited)
    (edited / "plan.json").write_text((edited / "plan.json").read_text().replace('"dense"', '"skip"'))
    _one_line_error(capsys, ["bisect", "no_such_module_14:build", str(edited)], "plan.json")


def test_run_onnx_bad_dim_option_names_the_form(monkeypatch):
    from sparsec.tools.onnx_cli import _parse_dims

    assert _parse_dims(["s27=512"]) == {"s27": 512}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        _parse_dims(["s27"])


def test_python_dash_m_sparsec_runs_the_cli(tmp_path):
    env = {**os.environ, "SPARSEC_DEBUG": ""}
    result = subprocess.run([sys.executable, "-m", "sparsec", "plan", str(tmp_path / "missing")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("sparsec plan: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

