"""The generated-kernel cache survives a corrupt autotune.json and a read-only cache
directory, and GPU-target artifacts carry their kernel sources (all on CPU: generating a
kernel, importing it and the cache bookkeeping need no GPU)."""
import builtins
import io
import json
import os
import stat
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from sparsec.codegen.triton.configs import KernelConfig
from sparsec.codegen.triton import generator
from sparsec.codegen.triton.generator import KernelSpec
from sparsec.ir.plan import HeadGroup
from sparsec.runtime import kernels

sys.path.insert(0, str(Path(__file__).parent))
from test_compile import TinyAttention, compile_tiny  # noqa: E402

CONFIGS = [KernelConfig(16, 16, 4, 1), KernelConfig(32, 16, 4, 1)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh SPARSEC_CACHE_DIR and fresh per-process kernel-cache state."""
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_MODULES", {})
    monkeypatch.setattr(kernels, "_TUNED", {})
    monkeypatch.setattr(kernels, "_UNWRITABLE", set(), raising=False)
    monkeypatch.setattr(kernels, "_PRIVATE_DIR", [], raising=False)
    yield tmp_path / "cache"
    monkeypatch.undo()
    if (tmp_path / "cache").exists():
        restore_permissions(tmp_path / "cache")


def make_read_only(directory: Path, monkeypatch) -> None:
    """``directory`` and everything under it read-only: chmod, and (since root ignores
    permission bits) every open-for-writing, mkdir or rename under it refused as the kernel
    would refuse a non-root user."""
    directory.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(directory):
        for name in files:
            os.chmod(Path(root) / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    prefix = str(directory.resolve())

    def under(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(prefix)

    def denied(path):
        return PermissionError(13, "Permission denied (read-only cache)", os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename

    def guarded_open(file, mode="r", *args, **kwargs):
        if under(file) and any(flag in mode for flag in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if under(path) and not os.path.isdir(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_move(source, target, *args, **kwargs):
        if under(target) or under(source):
            raise denied(target)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "replace", guarded_move)
    monkeypatch.setattr(os, "rename", guarded_move)


def restore_permissions(directory: Path) -> None:
    for root, dirs, files in os.walk(directory):
        os.chmod(root, stat.S_IRWXU)
        for name in files:
            os.chmod(Path(root) / name, stat.S_IRUSR | stat.S_IWUSR)


def window_spec(window: int) -> KernelSpec:
    return KernelSpec.make("window", {"window": [window, 0]}, 16, "float32", True, CONFIGS[0], "cpu")


# -- autotune.json --------------------------------------------------------------------------

def fake_group(q):
    """What _choose_config reads of a group: arch, tensors, autotune key, and prepare(config)."""
    return types.SimpleNamespace(arch="cpu", q=q, k=q, v=q, mask=None, autotune_key=lambda candidates: "cpu|window|d16",
                                 prepare=lambda config: (lambda *args: None))


@pytest.fixture
def two_candidates(monkeypatch):
    """Two candidate configs, the second timed faster (no kernel is run)."""
    monkeypatch.setattr(kernels, "candidate_configs", lambda *args: list(CONFIGS))
    timings = iter([2.0, 1.0] * 10)
    monkeypatch.setattr(kernels.triton.testing, "do_bench", lambda *args, **kwargs: next(timings))


def test_corrupt_autotune_json_is_rebuilt_with_a_warning_naming_it(cache, two_candidates):
    directory = kernels.kernel_dir("cpu")
    directory.mkdir(parents=True)
    (directory / "autotune.json").write_text('{"cpu|window|d16": {"config": ')      # truncated write
    q = torch.zeros(1, 1, 16, 16)
    with pytest.warns(UserWarning, match="autotune.json"):
        chosen = kernels._choose_config(fake_group(q), autotune=True)
    assert chosen == CONFIGS[1]
    table = json.loads((directory / "autotune.json").read_text())           # rebuilt, valid
    assert table["cpu|window|d16"]["config"] == CONFIGS[1].to_dict()


def test_unwritable_cache_keeps_the_autotune_choice_in_process_with_one_warning(cache, two_candidates,
                                                                                 monkeypatch):
    make_read_only(cache, monkeypatch)
    q = torch.zeros(1, 1, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels._choose_config(fake_group(q), autotune=True) == CONFIGS[1]
        kernels._TUNED.clear()
        assert kernels._choose_config(fake_group(q), autotune=True) == CONFIGS[1]
    messages = [str(w.message) for w in caught if "not writable" in str(w.message)]
    assert len(messages) == 1 and str(cache) in messages[0]


def window_group(monkeypatch) -> kernels._Group:
    """A real group (its autotune key generates the candidates' sources), launching nothing."""
    q = torch.randn(1, 2, 37, 16, generator=torch.Generator().manual_seed(1))
    group = kernels._Group(q, q[:, :1], q[:, :1], None, 0.25, True, HeadGroup("window", {"window": [6, 0]}, [0, 1]))
    monkeypatch.setattr(group, "prepare", lambda config: (lambda *args: None))
    return group


def changed_template(monkeypatch) -> None:
    """A template change that keeps GENERATOR_VERSION (as three past changes did)."""
    monkeypatch.setattr(generator, "_HEADER", generator._HEADER + "# the template changed\n")
    monkeypatch.setattr(kernels, "_generate", generator.generate)          # not the cached sources


def test_autotune_key_follows_the_generated_kernels(cache, monkeypatch):
    group = window_group(monkeypatch)
    key = group.autotune_key(tuple(CONFIGS))
    assert key == group.autotune_key(tuple(CONFIGS))
    assert key != group.autotune_key(tuple(CONFIGS[:1]))                  # another candidate list
    changed_template(monkeypatch)
    assert key != group.autotune_key(tuple(CONFIGS))


def test_stored_choice_is_not_reused_after_a_template_change(cache, monkeypatch):
    monkeypatch.setattr(kernels, "candidate_configs", lambda *args: tuple(CONFIGS))
    timings = iter([2.0, 1.0])                                             # the second config wins
    monkeypatch.setattr(kernels.triton.testing, "do_bench", lambda *args, **kwargs: next(timings))
    assert kernels._choose_config(window_group(monkeypatch), autotune=True) == CONFIGS[1]
    kernels._TUNED.clear()                                                 # a later process, same kernels:
    assert kernels._choose_config(window_group(monkeypatch), autotune=True) == CONFIGS[1]   # stored, not timed
    changed_template(monkeypatch)
    kernels._TUNED.clear()                                                 # a later process, changed kernels:
    timings = iter([1.0, 2.0])                                             # now the first config wins
    assert kernels._choose_config(window_group(monkeypatch), autotune=True) == CONFIGS[0]
    assert len(json.loads((kernels.kernel_dir("cpu") / "autotune.json").read_text())) == 2


# -- kernel files ---------------------------------------------------------------------------

def test_read_only_cache_holding_the_kernels_works_without_warning(cache, monkeypatch):
    first = kernels.load_kernel(window_spec(5))
    assert Path(first.__file__).parent == kernels.kernel_dir("cpu")
    kernels._MODULES.clear()                                 # a new process, same cache
    make_read_only(cache, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = kernels.load_kernel(window_spec(5))
    assert module.SPEC["params"] == {"window": [5, 0]}
    assert Path(module.__file__).parent == kernels.kernel_dir("cpu")


def test_unwritable_cache_falls_back_to_private_files_with_one_warning(cache, monkeypatch):
    make_read_only(cache, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modules = [kernels.load_kernel(window_spec(w)) for w in (3, 7)]
    assert [m.SPEC["params"]["window"] for m in modules] == [[3, 0], [7, 0]]
    assert all(not Path(m.__file__).is_relative_to(cache) for m in modules)
    messages = [str(w.message) for w in caught if "not writable" in str(w.message)]
    assert len(messages) == 1


# -- artifacts carry kernel sources ---------------------------------------------------------

def test_gpu_target_artifact_holds_kernel_sources_listed_in_manifest(tmp_path):
    torch.manual_seed(0)
    cm = compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32), target="h100")
    path = cm.save(tmp_path / "artifact")
    sources = sorted((path / "kernels").glob("*.py"))
    assert [p.name.split("_")[0] for p in sources] == ["sink", "window"]      # one per sparse group
    manifest = json.loads((path / "manifest.json").read_text())
    for source in sources:
        assert f"kernels/{source.name}" in manifest["files"]
        text = source.read_text()
        assert text.startswith('"""sparsec generated kernel') and "arch sm90" in text
        assert "site " in text and "heads [" in text            # the plan entry it serves
    cpu = compile_tiny(TinyAttention().eval(), torch.randn(2, 20, 32), target="cpu").save(tmp_path / "cpu")
    assert not (cpu / "kernels").exists()
