"""Typed errors. Every message names the problem and the fix."""
from __future__ import annotations


class SparsecError(Exception):
    """Base class of every error sparsec raises on purpose."""


class InvalidArgumentError(SparsecError, ValueError):
    """An argument of ``sparsec.compile`` outside its valid range (e.g. ``recall``), or
    example / calibration inputs that hold NaN or infinity."""


class CaptureError(SparsecError):
    """torch.export could not capture the model."""

    def __init__(self, reason: str):
        super().__init__(
            "sparsec could not capture the model with torch.export (non-strict). "
            f"Underlying reason: {reason}\n"
            "Fix: make the forward traceable (no data-dependent Python control flow, "
            "no unsupported ops), or pass example_inputs that match how the model is called."
        )
        self.reason = reason


class NoAttentionError(SparsecError):
    """The captured graph holds no attention sparsec recognises."""


class CalibrationMismatchError(SparsecError):
    """A calibration input does not match the structure of the example inputs."""


class UnsupportedDtypeError(SparsecError):
    """An input or model dtype that a kernel or pass cannot handle."""


class ArtifactError(SparsecError):
    """Base class for problems with a saved artifact."""


class ArtifactMissingError(ArtifactError):
    """The artifact directory or one of its files does not exist."""


class ArtifactCorruptError(ArtifactError):
    """A file of the artifact does not match its recorded hash."""


class ArtifactVersionError(ArtifactError):
    """The artifact was written by an incompatible sparsec or plan version."""


class UnservableInputError(SparsecError):
    """An input the compiled model cannot serve (wrong shape, dtype or structure)."""


class PlanError(SparsecError):
    """A plan that is inconsistent with the graph or with itself."""


class ArtifactUnsafeError(ArtifactCorruptError):
    """An artifact holds something ``sparsec.load`` refuses to run or unpickle: code in the
    program (guards, symbolic expressions, names), an operator outside the allowed
    namespaces, or a file of a format load never reads (a pickle)."""


class ArtifactMismatchError(ArtifactCorruptError):
    """The plan and the program of an artifact come from different saves (the program's
    recorded plan hash differs from plan.json)."""


class ArtifactTargetError(ArtifactError):
    """``CompiledModel.save`` refuses its target: a symlink, a file, or a non-empty
    directory that is not a sparsec artifact."""
