"""The targets.yaml schema (pydantic v2), less the formats: each format declares its own settings model
(a `FormatSettings`) in its module, and the loader (config/loader.py) puts them under `formats`.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..errors import BadInputError
from ..figures import parse_size
from .destination import DIR_PREFIX
from .fields import MAX_NAME, NAME_RE, Strict, TextSpec, check_name

# the formats' base models, re-exported: format modules and the loader import them from here
from .format_settings import CalibratedSettings as CalibratedSettings
from .format_settings import FormatSettings as FormatSettings
from .format_settings import format_settings as format_settings
from .licenses import check_license, check_license_link, check_license_name, check_release
from .runner import DEFAULT_RUNNER, RUNNER_JSON_SCHEMA, RunnerSpec
from .text import visible

_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# git check-ref-format forbids these in a ref; the Hub resolves branches, tags and commit shas
_REVISION_RE = re.compile(r"[^\s\x00-\x1f\x7f~^:?*\[\\]{1,255}")
_TEMPLATE_FIELDS = frozenset({"model", "format", "FORMAT"})


class CalibrationSettings(Strict):
    """`calibration`: the text GPTQ, AWQ and the GGUF importance matrix are calibrated on."""

    dataset: TextSpec = Field("builtin:mix", description="The same forms as `evaluation.dataset`. The default, "
                              "`builtin:mix`, mixes English prose, text in about 60 languages and 18 scripts, "
                              "code (Python, C, C++, Fortran) and chat turns rendered with the model's chat "
                              "template, taken from packages on the index and shipped frozen (docs/formats.md, "
                              "\"Calibration\"). Windows are cut from the end of the text, so that with the "
                              "evaluation's text they do not overlap its windows (taken from its start).")
    samples: int = Field(128, ge=1, le=100000, description="Windows.")
    seq_len: int = Field(512, ge=16, le=32768, description="Tokens per window.")


class Formats(Strict):
    """`formats`: one optional field per registered format (the loader makes the subclass that has them)."""

    def enabled(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    def settings(self, name: str) -> FormatSettings:
        return getattr(self, name)


class PublishTarget(Strict):
    """`publish`: where finished, verified artifacts go."""

    to: str = Field("dir:./dist", description="`hub`, or `dir:PATH`: a folder laid out like Hub repos, "
                    "PATH/<namespace>/<repo>/ (relative to the targets file).")
    namespace: str = Field("local", description="The Hub user or organization: the first part of each repo id.")
    private: bool = Field(False, description="Create new Hub repos as private.")
    repo: str = Field("{model}-{FORMAT}", description="Each repo's name; placeholders {model} {format} {FORMAT} "
                      "(e.g. my-org/Qwen2.5-7B-Instruct-GGUF).")
    # the Hub refuses files over 50 GB
    max_file_size: str | int = Field("48GB", description="Larger GGUF files are published as llama.cpp split shards "
                                     "(…-00001-of-00003.gguf), which llama.cpp, Ollama and LM Studio load from the "
                                     "first: a size such as 48GB, 500MB or 2GiB (or a number of bytes), at least 1MB.")

    @property
    def max_file_bytes(self) -> int:
        return parse_size(self.max_file_size)

    @property
    def folder(self) -> str | None:
        """A `dir:` destination's folder as written (relative to the targets file); None for the Hub."""
        return self.to[len(DIR_PREFIX):] if self.to.startswith(DIR_PREFIX) else None

    @field_validator("max_file_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> str | int:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError("expected a size such as 48GB, 500MB or 2GiB")
        try:
            size = parse_size(value)
        except (ValueError, OverflowError):  # OverflowError: '1e400GB' is an infinite float
            raise ValueError("expected a size such as 48GB, 500MB or 2GiB") from None
        if size < 1_000_000:
            raise ValueError("must be at least 1MB")
        return value

    @field_validator("to")
    @classmethod
    def _known_publisher(cls, value: str) -> str:
        if (value.startswith(DIR_PREFIX) and value[len(DIR_PREFIX):].strip()) or value == "hub":
            return visible(value)
        raise ValueError("expected hub, or dir:PATH (a folder laid out like Hub repos)")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_name(value, "it is the first part of each repo id")

    @field_validator("repo")
    @classmethod
    def _repo_template(cls, value: str) -> str:
        visible(value)
        # only bare placeholders: a format spec such as {model:>999999999} would build a gigabyte string
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value)
                      if name is not None]
        except ValueError as exc:
            raise ValueError(f"bad template ({exc}); placeholders: {{model}} {{format}} {{FORMAT}}") from None
        for name, spec, conv in fields:
            if name not in _TEMPLATE_FIELDS or spec or conv:
                raise ValueError(f"bad placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                                 "; placeholders: {model} {format} {FORMAT}")
        if not NAME_RE.fullmatch(value.format(model="m", format="f", FORMAT="F")):
            raise ValueError("the rendered repo name may use letters, digits, '.', '_' or '-'")
        return value

    def repo_name(self, model: str, fmt: str, label: str | None = None) -> str:
        """The repo name for `model`'s format `fmt`; `label`: the format settings' repo_label() (unset: the format's
        name in capitals)."""
        label = label or fmt.upper()
        return self.repo.format(model=model, format=label.lower(), FORMAT=label)


# The loosest gate a limit may set: 10 is a perplexity eleven times the source's (+1000%), or a mean KL divergence
# of 10 nats. An artifact past either is broken, not quantized; a larger limit (1e300) would pass anything and say
# nothing. To publish regardless, build with --no-gate.
GATE_LIMITS = {"max_ppl_increase": 10.0, "max_kld": 10.0}


def check_gate_limit(table: str, limit: float, key: str | None = None) -> float:
    """A gate's limit, checked: finite, at least 0, at most GATE_LIMITS[table]."""
    where = f"{key!r}: " if key else ""
    if not math.isfinite(limit) or limit < 0:  # NaN would pass `limit < 0` and every gate
        raise ValueError(f"{where}must be >= 0 and finite")
    if limit > GATE_LIMITS[table]:
        raise ValueError(f"{where}{limit:g} is more than {GATE_LIMITS[table]:g}"
                         + (" (+1000%: eleven times the source's perplexity)" if table == "max_ppl_increase" else "")
                         + ", which passes a broken artifact; use --no-gate to publish regardless")
    return limit


class EvaluationSettings(Strict):
    """`evaluation`: the perplexity / KL smoke test against the source model, and its gates."""

    dataset: TextSpec = Field("builtin", description="The text: `builtin` (Python's documentation topics, offline), "
                              "`builtin:mix` (the calibration's default mix), "
                              "`file:a.txt[,b.txt]` (relative to the targets file) or `hf:REPO:CONFIG:SPLIT:COLUMN` "
                              "(a dataset on the Hub). Windows are cut from its start.")
    ctx: int = Field(512, ge=16, le=32768, description="Tokens per window (even); the second half of each is scored.")
    chunks: int = Field(32, ge=1, le=100000, description="Windows.")
    # gates: keys are a format ("gguf") or a format and type ("gguf/Q4_K_M"); the most specific wins
    max_ppl_increase: dict[str, float] = Field(
        {}, description="Gates: the largest perplexity increase relative to the source's on the "
        "same windows (0.10 = +10%), by format (`gguf`) or format and type (`gguf/Q4_K_M`); the most specific "
        "key wins. Unset: each format's own default, by type or by bit width (docs/formats.md, \"Default "
        "gates\").")
    max_kld: dict[str, float] = Field({}, description="Gates on the mean KL divergence from the "
                                      "source, keyed like `max_ppl_increase`, e.g. {gguf/Q8_0: 0.01}; none by default.")
    tokenizer_check: bool = Field(True, description="The artifact must tokenize the text like the source.")

    @field_validator("ctx")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (the second half of each window is scored)")
        return value

    @field_validator("max_ppl_increase", "max_kld")
    @classmethod
    def _gate_keys(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        """Keys are FORMAT or FORMAT/TYPE of a registered format."""
        formats = format_settings()
        out = {}
        for key, limit in value.items():
            fmt, _, qtype = key.partition("/")
            if fmt not in formats:
                raise ValueError(f"{key!r}: unknown format {fmt!r} (formats: {', '.join(formats)})")
            if qtype:
                qtype = formats[fmt].gate_type(key, qtype)
            out[f"{fmt}/{qtype.upper()}" if qtype else fmt] = check_gate_limit(info.field_name, limit, key)
        return out

    def gate(self, table: str, fmt: str, qtype: str | None, default: float | None) -> float | None:
        limits = getattr(self, table)
        if qtype and f"{fmt}/{qtype}" in limits:
            return limits[f"{fmt}/{qtype}"]
        return limits.get(fmt, default)


class ModelSettings(Strict):
    """Everything a model may inherit from `defaults`."""

    revision: str = Field("main", description="A Hub source's branch, tag or commit; resolved to a commit sha at "
                          "plan time and recorded.")
    trust_remote_code: bool = Field(False, description="Also download the repo's *.py files, and let transformers "
                                    "run them.")
    allow_patterns: list[Annotated[str, Field(min_length=1), AfterValidator(visible)]] | None = Field(
        None, description="The files downloaded from a Hub source (unset: *.safetensors *.json tokenizer.model "
        "*.tiktoken *.txt *.jinja README.md LICENSE*).")
    formats: Formats = Field(Formats(), description="What to build: one entry per format.")
    publish: PublishTarget = PublishTarget()
    evaluation: EvaluationSettings = EvaluationSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    runner: Annotated[RunnerSpec, WithJsonSchema(RUNNER_JSON_SCHEMA)] = Field(
        DEFAULT_RUNNER, description="The GitHub Actions runner of this model's nightly leg "
                               "(`plan --github-matrix`): a label, a list of labels a runner must have all of "
                               "([self-hosted, gpu]), or {labels: [...], cores:, memory:, disk:, gpu_memory:, "
                               "timeout:} with its sizes, which plan checks the leg against.")

    license: Annotated[str, AfterValidator(check_license)] | None = Field(
        None, description="The Hub licence id the model's repos declare (apache-2.0, llama3.1, …; unset: the source "
        "card's); `other` takes `license_name` and `license_link`. `validate` warns when a repo would have none.")
    license_name: Annotated[str, AfterValidator(visible), AfterValidator(check_license_name)] | None = Field(
        None, description="With `license: other`: the licence's name.")
    license_link: Annotated[str, AfterValidator(visible), AfterValidator(check_license_link)] | None = Field(
        None, description="With `license: other`: a link to the licence's text.")

    @model_validator(mode="after")
    def _licence(self) -> ModelSettings:
        check_release(self)
        return self

    @field_validator("revision", mode="before")
    @classmethod
    def _revision_is_text(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("YAML read this revision as true/false; put it in quotes")
        if isinstance(value, int | float):
            raise ValueError("YAML read this revision as a number; put it in quotes")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        if not _REVISION_RE.fullmatch(visible(value)):
            raise ValueError("expected a branch, tag or commit sha: not empty, no spaces or control characters, "
                             "none of ~^:?*[\\")
        return value


class ModelTarget(ModelSettings):
    """One entry of `models`."""

    name: str = Field(description="Names folders, files (NAME-Q4_K_M.gguf) and repos: letters, digits, '.', '_' "
                      "and '-', at most 96 characters.")
    source: str = Field(description="A Hub repo id (org/name), or a local folder: ./path, ../path, /path or ~/path "
                        "(relative to the targets file; an existing folder is local without ./ too).")
    # Not a default: one base model for every model would be wrong for all but one
    base_model: str | None = Field(None, description="The Hub repo the source is a copy of: the cards' model tree "
                                   "(unset: a Hub source is its own). Per model, not in defaults.")

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _REPO_ID_RE.fullmatch(visible(value)) or any(len(p) > MAX_NAME for p in value.split("/")):
            raise ValueError("expected a Hub repo id (org/name): the model the source is a copy of")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "it names files, folders and repos")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        visible(value)
        if is_local_source(value):
            return value
        if not _REPO_ID_RE.fullmatch(value):
            raise ValueError("expected a Hub repo id (org/name) or a local folder starting with ./, ../, / or ~")
        if any(len(part) > MAX_NAME for part in value.split("/")):
            raise ValueError(f"a Hub repo id's parts are at most {MAX_NAME} characters each")
        return value

    @model_validator(mode="after")
    def _has_formats(self) -> ModelTarget:
        if not self.formats.enabled():
            raise ValueError(f"no formats: add formats.<{'|'.join(type(self.formats).model_fields)}>")
        return self


def is_local_source(source: str) -> bool:
    return source.startswith((".", "/", "~"))


@dataclass(frozen=True)
class Targets:
    """A validated targets file."""

    path: Path
    models: tuple[ModelTarget, ...]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve_path(self, value: str) -> Path:
        """A path written in the file, relative to the file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def with_publish_to(targets: Targets, to: str) -> Targets:
    """The same targets, every model publishing to `to` (quantforge push --to)."""
    try:
        PublishTarget(to=to)
    except ValidationError as exc:
        raise BadInputError(f"--to {to}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    models = tuple(m.model_copy(update={"publish": m.publish.model_copy(update={"to": to})}) for m in targets.models)
    return Targets(path=targets.path, models=models)


