"""Saved artifacts: a directory that ``sparsec.load`` turns back into a working model
without the original Python class.

Layout::

    manifest.json   format version, sparsec version, target, sha256 of every other file
    plan.json       the plan
    program.pt2     torch.export of the compiled graph (sparsec ops registered on import)
    kernels/        generated kernel sources, when the target has any
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sparsec.errors import ArtifactCorruptError, ArtifactMissingError, ArtifactVersionError

FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(directory: "str | Path", program: torch.export.ExportedProgram, plan_json: str,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write the program, plan and ``extra_files`` (relative path → text) plus a manifest."""
    from sparsec import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, directory / "program.pt2")
    (directory / "plan.json").write_text(plan_json)
    for relative, text in (extra_files or {}).items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_text(text)
    files = ["program.pt2", "plan.json", *sorted(extra_files or {})]
    manifest = {"format_version": FORMAT_VERSION, "sparsec_version": __version__,
                "files": {name: _sha256(directory / name) for name in files}}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return directory


def read_artifact(directory: "str | Path") -> tuple[torch.export.ExportedProgram, str, dict]:
    """Check the manifest and hashes, then return (program, plan JSON text, manifest)."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactMissingError(f"{manifest_path} does not exist; pass the directory that "
                                   "CompiledModel.save() wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactCorruptError(f"{manifest_path} is not valid JSON ({error}); re-save the artifact") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactVersionError(
            f"artifact format {manifest.get('format_version')} (written by sparsec "
            f"{manifest.get('sparsec_version')}) is not format {FORMAT_VERSION} that this sparsec reads; "
            "recompile and save with this sparsec")
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactMissingError(f"artifact file {path} is missing; re-save the artifact")
        if _sha256(path) != expected:
            raise ArtifactCorruptError(f"artifact file {path} does not match its recorded sha256 "
                                       "(modified or truncated); re-save the artifact")
    program = torch.export.load(directory / "program.pt2")
    return program, (directory / "plan.json").read_text(), manifest
