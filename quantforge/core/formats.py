"""The contract between the assembler, the publisher and an output format.

A format (formats/<name>.py) owns its settings model (the `formats.<name>` block of targets.yaml), the steps
that make and check its artifacts, the files it publishes and its section of the model card. It registers one
`Format` object; the assembler imports the format modules it offers and nothing else needs to know them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .step import PlanContext, Step, StepOutput

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..config.schema import EvaluationSettings, ModelTarget


@dataclass(frozen=True)
class EvalSteps:
    """A model's evaluation windows and the source's reference distribution on them."""

    tokens: Step
    reference: Step
    settings: EvaluationSettings


@dataclass(frozen=True)
class Publishable:
    """An artifact that may be published: the step holding its bytes and the gate that judged it."""

    name: str  # the GGUF type, or the format's name for a one-artifact format
    artifact: Step
    gate: Step


@dataclass
class PlannedFormat:
    steps: list[Step] = field(default_factory=list)
    publishable: list[Publishable] = field(default_factory=list)
    # steps (of stage "extra") whose outputs the repo publishes once, beside the artifacts: the importance matrix
    extras: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class PublishedArtifact:
    """The files one artifact puts in its repo."""

    files: dict[str, tuple[Path, str]]  # name in the repo -> (local path, sha256)
    sha256: str | None = None  # the artifact's digest when it is a single file
    shards: tuple[str, ...] = ()  # llama.cpp split files, when the file was over the size limit


@dataclass(frozen=True)
class BuiltArtifact:
    """One built artifact as a card or a manifest sees it: its output and its gate's output."""

    name: str
    output: StepOutput
    gate: StepOutput
    shards: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReleaseInfo:
    """What a repo says beyond its files: the model it quantizes (the Hub's model tree), its licence (declared in
    targets.yaml; unset, the card falls back to the source card's) and the repos one build publishes for the same
    model in its other formats."""

    base_model: str | None = None  # a Hub repo id
    license: str | None = None  # a Hub licence id; "other" with license_name / license_link
    license_name: str | None = None
    license_link: str | None = None
    siblings: tuple[tuple[str, str], ...] = ()  # (format, repo id) of the model's other repos


@dataclass(frozen=True)
class CardInputs:
    repo_id: str
    model: str
    namespace: str
    source: StepOutput
    tokens: StepOutput | None
    artifacts: tuple[BuiltArtifact, ...]
    release: ReleaseInfo = ReleaseInfo()
    extras: tuple[StepOutput, ...] = ()  # outputs of the format's extra steps (PlannedFormat.extras)
    removed: tuple[str, ...] = ()  # files the publication deletes: types no longer declared


@dataclass(frozen=True)
class RepoFile:
    """A file a format adds to its repo once, beside the artifacts (the importance matrix, Ollama's params)."""

    name: str  # in the repo
    path: Path
    sha256: str
    about: dict[str, Any] = field(default_factory=dict)  # what quantforge.json records of it (nothing local)


@dataclass(frozen=True)
class AdhocArtifact:
    """`quantforge eval`: an artifact made elsewhere, and the step that scores it."""

    format: str
    artifact: Step
    evaluate: Step


def folder_files(output: StepOutput) -> PublishedArtifact:
    """The files of an artifact that is a folder (its step's data names it: `dir`), at the repo's root: such a
    checkpoint is the repo, as its runtimes load it (safetensors shards of at most 5 GB, which the Hub takes)."""
    prefix = output.data["dir"] + "/"
    return PublishedArtifact({rel.removeprefix(prefix): (output.file(rel), meta["sha256"])
                              for rel, meta in output.files().items() if rel.startswith(prefix)})


Calibration = Callable[..., Step]  # (dataset=, samples=, seq_len=) -> the shared calibration step


class Format(Protocol):
    name: str
    settings: type[BaseModel]  # the `formats.<name>` schema
    card_template: str  # file name under quantforge/templates
    # the pip packages whose versions enter this format's step keys: `ci init` pins them, and a nightly's plan job
    # (which installs none of them) reads their versions from those pins
    key_tools: tuple[str, ...]

    def plan(self, model: ModelTarget, settings: Any, source: Step, evaluation: EvalSteps, context: PlanContext,
             calibration: Calibration) -> PlannedFormat: ...

    def published_files(self, output: StepOutput, scratch: Path, max_file_size: int) -> PublishedArtifact: ...

    def render_card(self, card: CardInputs) -> str: ...

    def repo_files(self, card: CardInputs, scratch: Path) -> tuple[RepoFile, ...]:
        """Files the repo holds once, beside its artifacts (written under `scratch` when derived)."""
        ...

    def adhoc(self, path: Path, source: Step, evaluation: EvalSteps, context: PlanContext) -> AdhocArtifact | None:
        """An evaluation plan for `path` when it is an artifact of this format, else None."""
        ...


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def format_named(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise LookupError(f"no format {name!r} is registered (registered: {', '.join(_FORMATS)})") from None


def registered_formats() -> dict[str, Format]:
    return dict(_FORMATS)
