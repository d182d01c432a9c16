"""The step contract: what a step is, what its implementation gets, and what it leaves behind.

A step is an immutable description: kind, parameters, input steps and tool versions. Its key is the sha256 of
all of them (inputs by their own keys, the kind's implementation version counted as a tool), so a change
anywhere upstream changes exactly the keys downstream. Model, format and type ride along as plain fields for
grouping and display; they are not part of the key, nor is `local` (machine-local facts such as absolute paths:
keys hold paths as written in the targets file, so they do not depend on the machine), nor `data_only`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..store import WorkDir, canonical_json
from .registry import kind_version


@dataclass(frozen=True, eq=False)
class Step:
    kind: str
    label: str  # unique in a plan, e.g. "smollm2/gguf/Q4_K_M:quantize"; names logs and state files
    params: Mapping[str, Any]
    inputs: Mapping[str, Step] = field(default_factory=dict)  # role -> step
    tools: Mapping[str, str] = field(default_factory=dict)  # tool -> version
    model: str = ""
    fmt: str = ""
    qtype: str | None = None  # the artifact's type within its format (a GGUF type), when a format has types
    # What only this machine knows and the run function needs (absolute paths, file sizes seen at plan time):
    # never part of the key, so that a plan made in another folder, by another user, has the same keys
    local: Mapping[str, Any] = field(default_factory=dict)
    # Input roles whose output this step reads only the recorded data of (the manifest), never the files: `build
    # --evict` may delete such an input's files before this step runs (core/engine.py), and the step then reads the
    # manifest eviction left behind. Not part of the key: it says how the step reads, not what it makes.
    data_only: frozenset[str] = frozenset()
    # Steps that must have run (and not failed) before this one, though it reads nothing of theirs: an upload waits
    # for its artifact's gate. Not part of the key: what was uploaded depends on the artifact alone, so a changed
    # gate does not upload it again.
    after: tuple[Step, ...] = ()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "params": dict(self.params),
            "inputs": {role: step.key for role, step in self.inputs.items()},
            # the implementation's version counts as a tool: changing what a kind produces makes it stale
            "tools": {**self.tools, "quantforge." + self.kind: kind_version(self.kind)},
        }

    @cached_property
    def key(self) -> str:
        return hashlib.sha256(canonical_json(self.fingerprint()).encode()).hexdigest()

    @property
    def artifact(self) -> str:
        """Which artifact this step belongs to, e.g. "m/gguf/Q4_K_M" (or the model alone for shared steps)."""
        return "/".join(part for part in (self.model, self.fmt, self.qtype) if part)


@dataclass(frozen=True)
class StepOutput:
    """A committed step output: its folder and its manifest (params, tools, files, data)."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def data(self) -> dict[str, Any]:
        return self.manifest.get("data", {})

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.get("params", {})

    @property
    def tools(self) -> dict[str, str]:
        return self.manifest.get("tools", {})

    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    def file(self, name: str) -> Path:
        return self.dir / name


@dataclass(frozen=True)
class BuildOptions:
    keep_going: bool = False
    dry_run: bool = False
    threads: int | None = None
    llama_cpp_dir: str | None = None
    offline: bool = False  # judge by the work dir alone: no look-up of what the destinations record
    evict: bool = False  # delete large outputs (registered evict=True) once every step that reads them has run
    keep_removed: bool = False  # a publish keeps the files of types no longer declared (default: deletes them)
    verify_published: bool = False  # compare published copies by content, not only by size (publish/copies.py)


@dataclass
class StepContext:
    """What a step's implementation gets: its step, a fresh output folder, its log, its inputs' outputs."""

    step: Step
    out_dir: Path
    log_path: Path
    inputs: dict[str, StepOutput]
    options: BuildOptions
    # a long step says how far it is ("layer 3/30"); the console shows it next to the step's label
    progress: Callable[[str], None] = lambda _text: None
    # label -> output of every step upstream of this one that has one here (built, evicted or recorded): what a
    # publish step records of them, so that a later run elsewhere can reuse their data (core/staleness.py)
    upstream: Callable[[], dict[str, StepOutput]] = dict


@dataclass
class PlanContext:
    """What planning needs from the outside world: source resolution and tool versions, resolved once."""

    work: WorkDir
    offline: bool = False
    llama_cpp_dir: str | None = None
    enforce_gates: bool = True  # --no-gate: measure and record, but publish regardless (recorded in the keys)
    _cache: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


@dataclass(frozen=True)
class Reason:
    """Why a step runs (or did not): data, rendered into a sentence by the presentation layer.

    what: never-built | output-missing | params | tools | input | inputs | published | input-failed | stopped
          | unpublished (the destination holds no record of a finished quantforge publication)
          | since-published (key: a step's label; new: new | changed | removed, against the published record)
          | moved (new: where a file outside the work dir, keyed by its content, now is)
          | redescribe (new: what an output made by an older quantforge lacks; its step runs again, same key)
          | published-changed (key: a published file; old: its recorded size or sha256, new: the one found)
    """

    what: str
    key: str | None = None
    old: Any = None
    new: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what}
        if self.key is not None:
            out["key"] = self.key
        if self.what in ("params", "tools", "published-changed"):
            out.update(old=self.old, new=self.new)
        elif self.new is not None:
            out["new"] = self.new
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reason:
        return cls(data["what"], data.get("key"), data.get("old"), data.get("new"))


@dataclass(frozen=True)
class Published:
    """What a destination outside the work dir records of a step's output (a published repo's quantforge.json):
    the key it was made with and the keys of the steps upstream of it. A nightly run judges a model by this record
    alone, with no work dir: a record carrying the step's key means nothing upstream has to run."""

    location: str  # where, for people (a repo id, a folder)
    key: str | None = None  # None: nothing published there, or published without a record of its keys
    steps: Mapping[str, str] = field(default_factory=dict)  # label -> key of every step upstream
    data: Mapping[str, Any] = field(default_factory=dict)  # what the report shows for the step when it is reused
    # label -> what the destination recorded of each step upstream (kind, key, params, tools, data, files): a step
    # whose key is recorded need not run where only its data is read (core/staleness.py, recorded_outputs)
    records: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source_commit: str | None = None  # the Hub source's commit the publication was built from (provenance)
    # what differs between the copy the destination holds and what the record lists (publish/copies.py): with the
    # step's key recorded, these are why it runs again
    problems: tuple[Reason, ...] = ()
