"""Saved artifacts: a directory that ``sparsec.load`` turns back into a working model
without the original Python class — and without running anything the artifact holds.

Layout (format 2)::

    manifest.json   format version, sparsec version, target, plan sha256, sha256 of every other file
    plan.json       the plan
    program.pt2     a zip (stored, not torch.export's own layout) of
                      program.json        torch.export's JSON schema of the compiled graph, plus
                                          {"sparsec": {"plan_sha256": ...}}: the plan it was built from
                      weights.safetensors parameters, buffers and tensor constants
                      inputs.safetensors  the example inputs (their structure in program.json)
    kernels/        generated Triton kernel sources for the plan's groups (GPU targets)

What load trusts: nothing in the directory is executed or unpickled. JSON is parsed,
tensors come from safetensors (raw bytes + a JSON header), and the program JSON is checked
by :mod:`sparsec.runtime.program_check` before torch.export's deserializer sees it (only
operators of aten / prims / sparsec, symbolic expressions in torch's own grammar, plain
names; its guard code is dropped and regenerated). Kernel sources are listed and hashed,
never imported by load. The hashes detect damage and mixed saves (the program records its
plan's hash), not forgery: whoever may write the directory chooses which model runs.

Saves are atomic and locked (:mod:`sparsec.runtime.artifact_lock`).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from sparsec.ir.errors import (ArtifactCorruptError, ArtifactError, ArtifactMismatchError, ArtifactMissingError,
                            ArtifactUnsafeError, ArtifactVersionError)
from sparsec.runtime.artifact_lock import DirectoryReader, lock_path, replace_directory, write_file

FORMAT_VERSION = 2
_PROGRAM_MEMBERS = ("program.json", "weights.safetensors", "inputs.safetensors")
_MAX_MEMBER_BYTES = 1 << 40
_READ_ATTEMPTS = 5              # a concurrent save may delete the version a reader opened


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- program archive -------------------------------------------------------------------------

def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # safetensors refuses shared storage and non-contiguous views: give it private copies.
    return save({name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()})


def _tensors_from_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as error:  # noqa: BLE001 — any parse failure is a damaged file
        raise ArtifactCorruptError(f"{what} is not a valid safetensors file ({error}); re-save the artifact") from None


def _program_archive(program: torch.export.ExportedProgram, example: tuple, plan_sha256: str) -> bytes:
    from torch._export.serde.serialize import serialize

    serialized = serialize(program, serialize_state_dict=False, serialize_constants=False,
                           serialize_example_inputs=False)
    leaves, spec = pytree.tree_flatten(example)
    tensors, layout = {}, []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[f"input_{index}"] = leaf
            layout.append({"tensor": f"input_{index}"})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            layout.append({"value": leaf})
        else:
            raise ArtifactError(f"example input of type {type(leaf).__name__} cannot be saved; "
                                "compile with tensor (or int / float / str) inputs")
    weights = {}
    for name, value in {**program.state_dict, **program.constants}.items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"program constant {name} is a {type(value).__name__}, not a tensor; "
                                "artifacts hold tensors only")
        weights[name] = value
    parameters = {name: value.requires_grad for name, value in program.state_dict.items()
                  if isinstance(value, torch.nn.Parameter)}
    document = {
        "sparsec": {"plan_sha256": plan_sha256, "parameters": parameters,
                    "state_dict": sorted(program.state_dict), "constants": sorted(program.constants),
                    "inputs": {"spec": pytree.treespec_dumps(spec), "leaves": layout}},
        "exported_program": json.loads(serialized.exported_program),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("program.json", json.dumps(document))
        archive.writestr("weights.safetensors", _tensor_bytes(weights))
        archive.writestr("inputs.safetensors", _tensor_bytes(tensors))
    return buffer.getvalue()


def _archive_members(data: bytes, path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            if names != set(_PROGRAM_MEMBERS):
                raise ArtifactUnsafeError(f"{path} holds members {sorted(names)}, not {list(_PROGRAM_MEMBERS)} "
                                          "(load reads no pickles); re-save the artifact with this sparsec")
            if any(info.file_size > _MAX_MEMBER_BYTES for info in archive.infolist()):
                raise ArtifactCorruptError(f"{path} declares an implausibly large member; re-save the artifact")
            return {name: archive.read(name) for name in _PROGRAM_MEMBERS}
    except zipfile.BadZipFile as error:
        raise ArtifactCorruptError(f"{path} is not a sparsec program archive ({error}); re-save the artifact") from None


def _program_document(members: dict[str, bytes], path: Path) -> dict:
    try:
        document = json.loads(members["program.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactCorruptError(f"{path}: program.json is not valid JSON ({error}); re-save the artifact") from None
    if not isinstance(document, dict) or not isinstance(document.get("sparsec"), dict):
        raise ArtifactCorruptError(f"{path}: program.json lacks its sparsec record; re-save the artifact")
    return document


def _example_inputs(record: dict, tensors: dict[str, torch.Tensor]) -> tuple:
    from sparsec.runtime.program_check import check_spec

    check_spec(record["spec"], "example input spec")
    spec = pytree.treespec_loads(record["spec"])
    leaves = []
    for entry in record["leaves"]:
        if "tensor" in entry:
            leaves.append(tensors[entry["tensor"]])
        else:
            value = entry.get("value")
            if not (value is None or isinstance(value, (bool, int, float, str))):
                raise ArtifactUnsafeError("an example input that is not a tensor or a plain value")
            leaves.append(value)
    return pytree.tree_unflatten(leaves, spec)


def _deserialize_program(document: dict, members: dict[str, bytes], path: Path) -> torch.export.ExportedProgram:
    from torch._export.serde.schema import ExportedProgram as SerializedProgram
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    import sparsec.ir.ops  # noqa: F401 — registers the sparsec operators the graph calls
    import sparsec.ir.linear_ops  # noqa: F401
    from sparsec.runtime.program_check import sanitize_program_json

    record = document["sparsec"]
    program_json = sanitize_program_json(document.get("exported_program"))
    weights = _tensors_from_bytes(members["weights.safetensors"], f"{path}: weights.safetensors")
    inputs = _tensors_from_bytes(members["inputs.safetensors"], f"{path}: inputs.safetensors")
    try:
        parameters = record.get("parameters", {})
        state_dict = {name: (torch.nn.Parameter(weights[name], requires_grad=bool(parameters[name]))
                             if name in parameters else weights[name]) for name in record["state_dict"]}
        constants = {name: weights[name] for name in record["constants"]}
        example = _example_inputs(record["inputs"], inputs)
        serialized = _dict_to_dataclass(SerializedProgram, program_json)
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example)
    except ArtifactUnsafeError:
        raise
    except Exception as error:  # noqa: BLE001 — a program torch cannot rebuild is a damaged one
        raise ArtifactCorruptError(f"{path}: the program could not be rebuilt ({type(error).__name__}: "
                                   f"{str(error)[:300]}); re-save the artifact with this sparsec") from None


# -- writing --------------------------------------------------------------------------------

def is_artifact(directory: Path) -> bool:
    """Whether ``directory`` holds a sparsec manifest (so save may replace it)."""
    manifest = directory / "manifest.json"
    if manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "sparsec_version" in data


def write_artifact(directory: "str | Path", program: torch.export.ExportedProgram, plan_json: str,
                   extra_files: dict[str, str] | None = None, example_inputs: tuple | None = None) -> Path:
    """Write the program, plan and ``extra_files`` (relative path → text, e.g. kernels) plus a
    manifest, atomically replacing any previous artifact at ``directory``."""
    from sparsec.ir.version import __version__

    plan_bytes = plan_json.encode()
    plan_sha256 = _sha256_bytes(plan_bytes)
    example = example_inputs if example_inputs is not None else (program.example_inputs or ((), {}))
    files = {"program.pt2": _program_archive(program, example, plan_sha256), "plan.json": plan_bytes}
    for relative, text in sorted((extra_files or {}).items()):
        files[relative] = text.encode()
    manifest = {"format_version": FORMAT_VERSION, "sparsec_version": __version__, "plan_sha256": plan_sha256,
                "files": {name: _sha256_bytes(data) for name, data in files.items()}}

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            write_file(tmp, name, data)
        write_file(tmp, "manifest.json", json.dumps(manifest, indent=1).encode())

    return replace_directory(directory, fill, is_artifact)


# -- reading --------------------------------------------------------------------------------

def _read_manifest(reader: DirectoryReader) -> dict:
    manifest_path = reader.directory / "manifest.json"
    data = reader.read("manifest.json")
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactCorruptError(f"{manifest_path} is not valid JSON ({error}); re-save the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactCorruptError(f"{manifest_path} is not a manifest; re-save the artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactVersionError(
            f"artifact format {manifest.get('format_version')!r} (written by sparsec "
            f"{manifest.get('sparsec_version')}) is not format {FORMAT_VERSION!r} that this sparsec reads; "
            "recompile and save with this sparsec")
    if not isinstance(manifest.get("files"), dict) or not {"program.pt2", "plan.json"} <= set(manifest["files"]):
        raise ArtifactCorruptError(f"{manifest_path} does not list program.pt2 and plan.json; re-save the artifact")
    return manifest


def _read_checked(reader: DirectoryReader, manifest: dict, names) -> dict[str, bytes]:
    contents = {}
    for name in names:
        data = reader.read(name)
        if _sha256_bytes(data) != manifest["files"][name]:
            raise ArtifactCorruptError(f"artifact file {reader.directory / name} does not match its recorded "
                                       "sha256 (modified or truncated); re-save the artifact")
        contents[name] = data
    return contents


def _check_binding(manifest: dict, plan_bytes: bytes, document: dict, directory: Path) -> None:
    actual = _sha256_bytes(plan_bytes)
    recorded = document["sparsec"].get("plan_sha256")
    if recorded != actual or manifest.get("plan_sha256") != actual:
        raise ArtifactMismatchError(
            f"{directory}: plan.json (sha256 {actual[:12]}) is not the plan the program was built from "
            f"(program records {str(recorded)[:12]}, manifest {str(manifest.get('plan_sha256'))[:12]}): "
            "the plan was edited or comes from another save. Recompile with the edited plan "
            "(sparsec.compile(model, ..., plan=plan)) and save again")


def _with_retries(directory: Path, read):
    """``read(reader)`` on one opened version of ``directory``; a concurrent save that deletes
    that version under the reader makes it retry on the new one."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            with DirectoryReader(directory) as reader:
                return read(reader)
        except (ArtifactMissingError, ArtifactCorruptError):
            # Only a directory that saves write to (its sibling lock file exists) can change
            # under a reader; anything else is reported at once.
            if attempt == _READ_ATTEMPTS - 1 or not lock_path(directory).exists():
                raise
            time.sleep(0.02 * (attempt + 1))


def _read_bound(reader: DirectoryReader, names) -> tuple[dict, bytes, dict[str, bytes], dict]:
    """Manifest, plan bytes, program members and program document of one version, after the
    hashes of the manifest's ``names`` (or all its files) and the plan binding are checked."""
    directory = reader.directory
    manifest = _read_manifest(reader)
    contents = _read_checked(reader, manifest, sorted(manifest["files"]) if names is None else names)
    members = _archive_members(contents["program.pt2"], directory / "program.pt2")
    document = _program_document(members, directory / "program.pt2")
    _check_binding(manifest, contents["plan.json"], document, directory)
    return manifest, contents["plan.json"], members, document


def read_artifact(directory: "str | Path") -> tuple[torch.export.ExportedProgram, str, dict]:
    """Check the manifest, hashes and plan binding, then return (program, plan JSON text, manifest)."""
    directory = Path(directory)
    manifest, plan_bytes, members, document = _with_retries(directory, lambda reader: _read_bound(reader, None))
    program = _deserialize_program(document, members, directory / "program.pt2")
    return program, plan_bytes.decode(), manifest


def read_plan_json(directory: "str | Path") -> str:
    """The plan JSON of an artifact after the same checks as load (hashes, plan binding),
    without rebuilding the program (``sparsec plan``)."""
    return _with_retries(Path(directory),
                         lambda reader: _read_bound(reader, ["plan.json", "program.pt2"])[1].decode())
