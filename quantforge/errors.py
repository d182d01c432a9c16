"""Every error quantforge raises on purpose. The CLI maps each type to one line and an exit code."""

from __future__ import annotations

from dataclasses import dataclass


class QuantforgeError(Exception):
    """Base of all quantforge errors."""

    exit_code = 1
    hint: str | None = None


class BadInputError(QuantforgeError, ValueError):
    """The user's input (targets file, CLI arguments, a source) is wrong: exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a targets file, located by file, line and key path."""

    file: str
    line: int | None
    key_path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        key = f" {self.key_path}:" if self.key_path else ""
        return f"{where}:{key} {self.message}"


class ConfigError(BadInputError):
    """The targets file is invalid; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class SourceError(BadInputError):
    """A source model cannot be found or resolved (missing folder, unknown repo or revision)."""


class ToolchainError(QuantforgeError):
    """An external tool (llama.cpp converter, libllama) is missing or failed to start."""


class ConversionError(QuantforgeError):
    """The converter refused or failed on a model (unknown tokenizer, unsupported architecture, ...)."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message)


class VerificationError(QuantforgeError):
    """An artifact failed the check by its real consumer (it does not load, or produces garbage)."""


class WorkDirLocked(QuantforgeError):
    """Another quantforge process holds the work directory."""


class PublishError(QuantforgeError):
    """Publishing an artifact failed."""

    status: int | None = None  # the destination's HTTP status, when it answered with one


class PreuploadRejected(PublishError):
    """The Hub refused a commit naming files uploaded ahead of it (publish/upload.py): it no longer holds them
    (uploads not committed in time expire), or never took them. Nothing was published."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


class DiskFull(QuantforgeError):
    """A write ran out of space: names the device and folder, and about how much the work needs."""


class GateFailed(QuantforgeError):
    """An artifact's measured quality is outside its gate: it must not be published."""


class IncompatibleShapes(QuantforgeError):
    """A model's layer shapes do not fit the requested quantization (e.g. a group size that does not divide a
    layer's input size)."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message)


class OutOfMemory(QuantforgeError):
    """A step needs more memory than the machine (or its cgroup limit) gives: it was killed for it, or refused
    before it started."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message)


class RunnerTooSmall(BadInputError):
    """A nightly leg's estimated disk, memory or time exceeds its runner's (config/runner.py): one line per leg,
    each with the figures and the runner to declare instead."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))
