"""The exceptions relayout raises, one class per family of the Rust crate's errors.

Every one carries the message the CLI prints (naming the file first), `kind` (the Rust
variant, e.g. ``"Truncated"``) and `path` (the file concerned, when there is one).
"""

from __future__ import annotations

from typing import Optional


class Error(Exception):
    """Base class of everything relayout raises about a checkpoint, rules or output."""

    kind: str = "Other"
    path: Optional[str] = None


class FormatError(Error):
    """The input is not a checkpoint relayout can read: unknown format, truncated,
    malformed header, zip or pickle, unsupported dtype or tensor, a size bomb."""


class ForbiddenGlobalError(FormatError):
    """The pickle names a global outside the allowlist; nothing was executed."""


class RulesError(Error):
    """A rule file, preset name, rule variable or module-types file is wrong."""


class PlanError(Error):
    """The rules map the checkpoint to something impossible: two tensors to one name, a
    shape a reshape or split cannot make."""


class UnmatchedError(PlanError):
    """Tensors match no rule (pass ``allow_unmatched=True`` to leave them out)."""


class VerifyError(PlanError):
    """The plan does not produce what the expectation file (``expect=``) asks for."""


class IOError(Error, OSError):  # noqa: A001 - relayout.IOError, an OSError too
    """Reading the input or writing the output failed (``errno`` is set when the OS
    gave one)."""


class OutputExistsError(IOError, FileExistsError):
    """The output exists (pass ``force=True`` to replace it)."""


class NoSpaceError(IOError):
    """The output does not fit in the free space of its file system."""


class InputChangedError(Error):
    """The input was changed or truncated while it was being read."""


class GPUError(Error):
    """The GPU asked for is not available, or it failed."""


class OutOfMemoryError(Error, MemoryError):
    """The arrays a load would return do not fit in this machine's memory."""


class MissingDependencyError(Error, ImportError):
    """An optional package a call needs (ml_dtypes, jax, mlx) is not installed."""


__all__ = [
    "Error",
    "FormatError",
    "ForbiddenGlobalError",
    "RulesError",
    "PlanError",
    "UnmatchedError",
    "VerifyError",
    "IOError",
    "OutputExistsError",
    "NoSpaceError",
    "InputChangedError",
    "GPUError",
    "OutOfMemoryError",
    "MissingDependencyError",
]
