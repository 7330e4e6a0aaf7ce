"""Atomic, locked replacement of an artifact directory, and reads of one whole version.

Design (``CompiledModel.save``):

- Writers take an exclusive ``fcntl`` lock on the sibling file ``.<name>.lock`` beside the
  target directory, so two saves to one path run one after the other.
- Everything is written into a fresh sibling ``.<name>.tmp-XXXX`` (``mkdtemp``: a new,
  empty, private directory, so nothing planted in the target — a symlink, say — is ever
  opened for writing), each file fsynced, then the directory itself.
- The swap: the old directory is renamed aside to ``.<name>.old-XXXX``, the new one renamed
  into place, the parent fsynced, the old one deleted (``rmtree`` never follows symlinks).
  A save that fails before the swap removes its temporary directory and leaves the previous
  artifact as it was; one interrupted between the two renames leaves the previous artifact
  in ``.<name>.old-XXXX``, which the next save restores if the target is missing.
- Readers (``sparsec.load``) take no lock: they open the directory once and read every file
  through that directory descriptor (``openat``, no symlinks followed), so a concurrent swap
  cannot mix two saves — a reader sees the version it opened, or, if that version is deleted
  under it, retries and at last raises a typed error.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sparsec.ir.errors import ArtifactMissingError, ArtifactTargetError


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_path(directory: Path) -> Path:
    """The sibling lock file ``.<name>.lock`` of ``directory`` (it exists once a save ran there)."""
    return directory.parent / f".{directory.name}.lock"


@contextmanager
def artifact_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on ``.<name>.lock`` beside ``directory`` (created if needed)."""
    fd = os.open(lock_path(directory), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_file(directory: Path, relative: str, data: bytes) -> None:
    """Create ``directory/relative`` (a new file in a directory this save made) and fsync it."""
    path = directory / relative
    if ".." in Path(relative).parts or Path(relative).is_absolute():
        raise ValueError(f"artifact file name {relative!r} leaves the artifact")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_target(directory: Path, is_artifact: Callable[[Path], bool]) -> None:
    if directory.is_symlink():
        raise ArtifactTargetError(f"{directory} is a symlink; save to the real directory it points to "
                                  "(save never follows links out of its target)")
    if directory.exists() and not directory.is_dir():
        raise ArtifactTargetError(f"{directory} exists and is not a directory; choose another path")
    if directory.is_dir() and any(directory.iterdir()) and not is_artifact(directory):
        raise ArtifactTargetError(f"{directory} is a non-empty directory that is not a sparsec artifact "
                                  "(no manifest.json of sparsec); save into a new or empty directory, or "
                                  "remove it first")


def replace_directory(directory: "str | Path", fill: Callable[[Path], None],
                      is_artifact: Callable[[Path], bool]) -> Path:
    """Build a new version of ``directory`` with ``fill(tmp_dir)`` and swap it into place
    atomically, under the sibling lock (see the module docstring)."""
    directory = Path(os.path.abspath(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(directory):
        _restore_interrupted(directory)
        _check_target(directory, is_artifact)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            os.chmod(tmp, 0o755)          # mkdtemp's 0700 would hide the artifact from other users
            fill(tmp)
            for root, _dirs, _files in os.walk(tmp):
                _fsync_directory(Path(root))
            old = None
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
                os.rename(directory, old / "artifact")
            os.rename(tmp, directory)
            _fsync_directory(directory.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def _restore_interrupted(directory: Path) -> None:
    """A save killed between its two renames left the previous version aside: put it back."""
    if directory.exists() or directory.is_symlink():
        return
    for aside in sorted(directory.parent.glob(f".{directory.name}.old-*/artifact")):
        os.rename(aside, directory)
        shutil.rmtree(aside.parent, ignore_errors=True)
        return


class DirectoryReader:
    """Files of one version of a directory, read through its descriptor (no symlinks)."""

    def __init__(self, directory: Path):
        self.directory = directory
        try:
            self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactMissingError(f"{directory} does not exist or is not a directory; pass the "
                                       "directory that CompiledModel.save() wrote") from None

    def read(self, relative: str) -> bytes:
        parts = Path(relative).parts
        if not parts or ".." in parts or Path(relative).is_absolute():
            raise ArtifactMissingError(f"artifact file name {relative!r} leaves the artifact")
        fd = self.fd
        opened = []
        try:
            for part in parts[:-1]:
                fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                opened.append(fd)
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                raise ArtifactMissingError(f"artifact file {self.directory / relative} is a symlink or not "
                                           "a file; load reads no links") from None
            raise ArtifactMissingError(f"artifact file {self.directory / relative} is missing; "
                                       "re-save the artifact") from None
        finally:
            for each in opened:
                os.close(each)
        with os.fdopen(file_fd, "rb") as f:
            return f.read()

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "DirectoryReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
