"""Artifacts cannot hurt the user: load runs nothing from the artifact, saves are atomic and
locked, plan and program are bound together."""
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import sparsec
from sparsec.ir.errors import ArtifactCorruptError, ArtifactError

sys.path.insert(0, str(Path(__file__).parent))
from test_compile import TinyAttention, compile_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32))


# -- an attacker's tools: rewrite files, recompute every hash of the manifest ---------------

def rehash(path: Path) -> None:
    import hashlib

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest))


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_bytes(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(Payload(marker))


def rewrite_archive(path: Path, edit) -> None:
    """Rewrite program.pt2's members with ``edit(name, data) -> data`` (whatever format it is)."""
    archive = path / "program.pt2"
    with zipfile.ZipFile(archive) as old:
        members = [(info.filename, old.read(info.filename)) for info in old.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as new:
        for name, data in members:
            new.writestr(name, edit(name, data))
    archive.write_bytes(buffer.getvalue())
    rehash(path)


def edit_program_json(path: Path, edit) -> None:
    """``edit(exported_program_json)`` on the program's torch.export JSON, wherever it lives."""
    def apply(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):                   # torch.export's own layout
            document = json.loads(data)
            edit(document)
            return json.dumps(document).encode()
        if name == "program.json":
            document = json.loads(data)
            edit(document["exported_program"])
            return json.dumps(document).encode()
        return data
    rewrite_archive(path, apply)


def pickle_everything(marker: Path):
    """Every member that is not JSON text becomes a pickle payload (weights marked pickled)."""
    def apply(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith(".json") or Path(name).name in {"archive_format", "archive_version", "version",
                                                         "byteorder", "serialization_id"}:
            return data
        return payload_bytes(marker)
    return apply


def torch_pt2_with_payload(tiny, path: Path, marker: Path) -> None:
    """program.pt2 replaced by torch.export.save's layout whose pickles carry the payload."""
    from sparsec.passes.helpers.capture import export_program

    program = export_program(tiny.graph_module, tiny.example_args, tiny.example_kwargs)
    torch.export.save(program, path / "program.pt2")
    rewrite_archive(path, pickle_everything(marker))


def guards_payload(marker: Path):
    def edit(program: dict) -> None:
        program["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
    return edit


def sympy_payload(marker: Path):
    def edit(program: dict) -> None:
        text = json.dumps(program)
        symbol = "Symbol('s27', positive=True, integer=True)"
        evil = f"Add(Integer(__import__('os').system('touch {marker}')), {symbol})"
        program.clear()
        program.update(json.loads(text.replace(json.dumps(symbol)[1:-1], json.dumps(evil)[1:-1])))
    return edit


CRAFTS = {
    "torch_pt2_pickles": lambda tiny, path, marker: torch_pt2_with_payload(tiny, path, marker),
    "every_member_pickled": lambda tiny, path, marker: rewrite_archive(path, pickle_everything(marker)),
    "guards_code": lambda tiny, path, marker: edit_program_json(path, guards_payload(marker)),
    "sympy_expression": lambda tiny, path, marker: edit_program_json(path, sympy_payload(marker)),
}


@pytest.mark.parametrize("craft", sorted(CRAFTS))
def test_crafted_artifact_runs_no_payload(tiny, tmp_path, craft):
    """An attacker rewrites the artifact (payload in every place that could run code) and
    recomputes the manifest: load must not run it, only raise a typed error."""
    path = tiny.save(tmp_path / "artifact")
    marker = tmp_path / "PWNED"
    CRAFTS[craft](tiny, path, marker)
    error = None
    try:
        loaded = sparsec.load(path)
        with torch.no_grad():
            loaded(torch.randn(2, 24, 32))
    except Exception as raised:  # noqa: BLE001 — judged below, after the marker
        error = raised
    assert not marker.exists(), f"{craft}: the artifact ran code during load"
    assert error is None or isinstance(error, ArtifactError), repr(error)


def test_program_check_refuses_code_in_names_and_targets():
    from sparsec.ir.errors import ArtifactUnsafeError
    from sparsec.runtime.program_check import check_expression, sanitize_program_json

    check_expression("Mul(Integer(32), Symbol('s27', positive=True, integer=True))")
    for bad in ("__import__('os')", "Symbol('s0').func", "Integer(1)[0]", "lambda: 1", "Symbol('x; y')"):
        with pytest.raises(ArtifactUnsafeError):
            check_expression(bad)
    node = {"target": "torch.serialization.os.system", "inputs": [], "outputs": [], "metadata": {}}
    with pytest.raises(ArtifactUnsafeError, match="torch.serialization.os.system"):
        sanitize_program_json({"graph_module": {"graph": {"nodes": [node]}}})
    node["target"] = "torch.ops.aten.add.Tensor"
    node["inputs"] = [{"name": "other", "arg": {"as_float": "-Infinity"}, "kind": 1},        # data, kept
                      {"name": "alpha", "arg": {"as_string": "any 'text' \"at all\""}, "kind": 1}]
    sanitize_program_json({"graph_module": {"graph": {"nodes": [node]}}, "guards_code": ["L['x'] == 1"]})
    with pytest.raises(ArtifactUnsafeError, match="characters"):
        sanitize_program_json({"graph_module": {"graph": {"nodes": [node]},
                                                "signature": {"input_specs": [{"name": 'p"+open("x")+"'}]}}})


# -- plan and program bound together --------------------------------------------------------

def test_edited_plan_with_recomputed_hash_is_detected(tiny, tmp_path, capsys):
    path = tiny.save(tmp_path / "artifact")
    plan = path / "plan.json"
    data = json.loads(plan.read_text())
    for entry in (*data["attention"][0]["heads"], *data["attention"][0]["groups"]):
        if entry["pattern"] == "window":
            entry["params"]["window"] = [6, 0]                 # a hand edit, no recompile
    plan.write_text(json.dumps(data, indent=1))
    rehash(path)
    with pytest.raises(ArtifactCorruptError, match="not the plan the program was built from"):
        sparsec.load(path)
    from sparsec.tools.cli import main

    assert main(["plan", str(path)]) == 2                     # one line, no traceback
    assert "not the plan the program was built from" in capsys.readouterr().err


# -- atomic, locked saves -------------------------------------------------------------------

def test_save_refuses_a_non_artifact_directory(tiny, tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "thesis.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a sparsec artifact"):
        tiny.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["thesis.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sparsec.load(tiny.save(empty)).plan.to_dict() == tiny.plan.to_dict()


def test_save_never_writes_through_a_planted_symlink(tiny, tmp_path):
    path = tiny.save(tmp_path / "artifact")
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    for name in ("plan.json", "program.pt2"):
        (path / name).unlink()
        (path / name).symlink_to(outside)
    tiny.save(path)
    assert outside.read_text() == "precious"
    assert sparsec.load(path).plan.to_dict() == tiny.plan.to_dict()


def test_failed_save_leaves_the_previous_artifact_intact(tiny, tmp_path, monkeypatch):
    path = tiny.save(tmp_path / "artifact")
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    torch.manual_seed(5)
    other = compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32), patterns={0: ("window", {"window": [3, 0]})})
    real_open, real_os_open = open, os.open

    def failing_open(file, mode="r", *args, **kwargs):      # the disk fills up at the manifest
        if str(file).endswith("manifest.json") and any(flag in mode for flag in "wax+"):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    def failing_os_open(file, flags, *args, **kwargs):
        if str(file).endswith("manifest.json") and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(28, "No space left on device")
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    monkeypatch.setattr("io.open", failing_open)
    monkeypatch.setattr(os, "open", failing_os_open)
    with pytest.raises(OSError, match="No space"):
        other.save(path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    assert sparsec.load(path).plan.to_dict() == tiny.plan.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir() if "artifact" in p.name) in (
        ["artifact"], [".artifact.lock", "artifact"])         # no temporary directories left


CONCURRENT = textwrap.dedent("""
    import sys, time, json, os, torch, sparsec
    from sparsec.ir.errors import ArtifactError
    role, target, ready = sys.argv[1], sys.argv[2], sys.argv[3]

    def start_together(duration=3.0):
        # Interpreter start-up is slow on a loaded machine: all three start the clock together.
        open(f"{ready}.{os.getpid()}", "w").close()
        directory, prefix = os.path.split(ready)
        while sum(name.startswith(prefix + ".") for name in os.listdir(directory)) < 3:
            time.sleep(0.01)
        return time.time() + duration

    if role == "writer":
        # What CompiledModel.save writes, exported once here so that the ~3 s go to writing.
        from sparsec.passes.helpers.capture import export_program
        from sparsec.runtime.artifact import write_artifact
        sources = []
        for source in sys.argv[4:]:
            cm = sparsec.load(source)
            sources.append((export_program(cm.graph_module, cm.example_args, cm.example_kwargs), cm.plan.to_json()))
        deadline = start_together()
        saves = 0
        while time.time() < deadline:
            write_artifact(target, *sources[saves % 2])
            saves += 1
            time.sleep(0.02)              # leave the reader some CPU on a small machine
        print(json.dumps({"saves": saves}))
    else:
        expected = json.loads(open(sys.argv[4]).read())
        x = torch.load(sys.argv[5], weights_only=True)
        sparsec.load(sys.argv[6])(x)      # warm up: the first load imports the deserializer
        deadline = start_together()
        seen = {"whole": 0, "typed": 0, "mixed": 0, "untyped": []}
        while time.time() < deadline:
            try:
                cm = sparsec.load(target)
            except ArtifactError:
                seen["typed"] += 1
                continue
            except Exception as error:
                seen["untyped"].append(repr(error)[:200])
                continue
            key = json.dumps(cm.plan.attention[0].groups[0].params, sort_keys=True) + cm.plan.attention[0].groups[0].pattern
            with torch.no_grad():
                out = cm(x)
            if key in expected and torch.allclose(out, torch.tensor(expected[key]), atol=1e-5):
                seen["whole"] += 1
            else:
                seen["mixed"] += 1
        print(json.dumps(seen))
""")


def test_concurrent_saves_and_loads_never_mix(tmp_path):
    """Two writers save two different models alternately into one path while a reader
    loads it for ~3 s: every load is one whole save (plan matches program output) or a
    typed error."""
    models, expected = [], {}
    x = torch.randn(1, 12, 32)
    for seed, patterns in ((1, {0: ("window", {"window": [3, 0]})}), (2, {0: ("sink_window",
                                                                            {"sink": [1, 0], "window": [2, 0]})})):
        torch.manual_seed(seed)
        cm = compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32), patterns=patterns)
        models.append(str(cm.save(tmp_path / f"source{seed}")))
        group = cm.plan.attention[0].groups[0]
        with torch.no_grad():
            expected[json.dumps(group.params, sort_keys=True) + group.pattern] = cm(x).tolist()
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    torch.save(x, tmp_path / "x.pt")
    target = tmp_path / "shared"
    sparsec.load(models[0]).save(target)
    (tmp_path / "race_artifact.py").write_text(CONCURRENT)
    ready = str(tmp_path / "ready" / "process")
    (tmp_path / "ready").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, str(tmp_path / "race_artifact.py")]
    writers = [subprocess.Popen([*command, "writer", str(target), ready, *(models if i == 0 else models[::-1])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    reader = subprocess.Popen([*command, "reader", str(target), ready, str(tmp_path / "expected.json"),
                               str(tmp_path / "x.pt"), models[0]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    outputs = [process.communicate(timeout=60) for process in (*writers, reader)]
    for process, (out, err) in zip((*writers, reader), outputs):
        assert process.returncode == 0, err[-2000:]
    saves = sum(json.loads(out.strip().splitlines()[-1])["saves"] for out, _ in outputs[:2])
    seen = json.loads(outputs[2][0].strip().splitlines()[-1])
    assert saves >= 6 and seen["whole"] >= 3, (saves, seen)
    assert seen["mixed"] == 0 and not seen["untyped"], seen
