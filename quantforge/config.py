"""The targets.yaml schema (pydantic v2) and its loader.

`defaults` are deep-merged into every model before validation, so a model states only what differs. Every
error names the file, the line and the key path; an error in a value that came from `defaults` points at the
line in `defaults`. Unknown keys are errors with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BadInputError, ConfigError, ConfigIssue
from .gguf_types import GGUF_TYPES, INTERMEDIATE_TYPES, NEEDS_IMATRIX

FORMAT_NAMES = ("gguf", "gptq", "awq")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


GGUFType = Annotated[Literal[tuple(GGUF_TYPES)], BeforeValidator(_upper)]  # type: ignore[valid-type]


class GGUFTarget(_Strict):
    """`formats.gguf`: which llama.cpp types to produce."""

    types: list[GGUFType] = Field(default_factory=lambda: ["Q4_K_M", "Q8_0"], min_length=1)
    intermediate: Literal[INTERMEDIATE_TYPES] = "auto"  # type: ignore[valid-type]
    # an importance matrix from the model-level `calibration` text weights the quantization error per column
    imatrix: bool = False

    @field_validator("types")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({t for t in value if value.count(t) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _imatrix_for_lowest_bits(self) -> GGUFTarget:
        needs = [t for t in self.types if t in NEEDS_IMATRIX]
        if needs and not self.imatrix:
            raise ValueError(f"{', '.join(needs)} need{'s' if len(needs) == 1 else ''} an importance matrix: "
                             "add imatrix: true")
        return self


class _CalibratedTarget(_Strict):
    """What GPTQ and AWQ share: bit width, groups, and (optionally) their own calibration text."""

    bits: int = 4
    # columns that share one scale; -1 = one group per row. Must divide every quantized layer's input size.
    group_size: int = 128
    # unset: the model's `calibration` settings
    samples: int | None = Field(None, ge=1, le=100000)
    seq_len: int | None = Field(None, ge=16, le=32768)
    dataset: str | None = None

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and value < 16:
            raise ValueError("expected -1 (one group per row) or a size of at least 16, such as 32, 64 or 128")
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str | None) -> str | None:
        from .data import parse_text_source

        if value is not None:
            parse_text_source(value)
        return value


class GPTQTarget(_CalibratedTarget):
    """`formats.gptq`: GPTQ through GPTQModel, written in the classic (v1) checkpoint format."""

    bits: Literal[2, 3, 4, 8] = 4
    desc_act: bool = False
    sym: bool = True
    damp: float = Field(0.01, gt=0, lt=1)  # dampening added to the Hessian diagonal, as a fraction of its mean


class AWQTarget(_CalibratedTarget):
    """`formats.awq`: AWQ through GPTQModel, written as GEMM (the layout vLLM, TGI and transformers read)."""

    bits: Literal[4] = 4  # the GEMM kernels are 4-bit only
    zero_point: bool = True

    @field_validator("group_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value == -1:
            raise ValueError("AWQ needs groups: use 32, 64 or 128")
        return value


class CalibrationSettings(_Strict):
    """`calibration`: the text GPTQ, AWQ and the GGUF importance matrix are calibrated on."""

    dataset: str = "builtin"
    samples: int = Field(128, ge=1, le=100000)
    seq_len: int = Field(512, ge=16, le=32768)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        from .data import parse_text_source

        parse_text_source(value)
        return value


class Formats(_Strict):
    gguf: GGUFTarget | None = None
    gptq: GPTQTarget | None = None
    awq: AWQTarget | None = None

    def enabled(self) -> list[str]:
        return [name for name in FORMAT_NAMES if getattr(self, name) is not None]


class PublishTarget(_Strict):
    """`publish`: where finished, verified artifacts go."""

    to: str = "dir:./dist"  # hub | dir:PATH
    namespace: str = "local"
    private: bool = False
    repo: str = "{model}-{FORMAT}"
    # larger GGUF files are published as llama.cpp split shards (the Hub refuses files over 50 GB)
    max_file_size: str | int = "48GB"

    @field_validator("max_file_size")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        from .toolchains.gguf_split import parse_size

        try:
            size = parse_size(value)
        except ValueError:
            raise ValueError("expected a size such as 48GB, 500MB or 2GiB") from None
        if size < 1_000_000:
            raise ValueError("must be at least 1MB")
        return value

    @field_validator("to")
    @classmethod
    def _known_publisher(cls, value: str) -> str:
        if (value.startswith("dir:") and len(value) > 4) or value == "hub":
            return value
        raise ValueError("expected hub, or dir:PATH (a folder laid out like Hub repos)")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return value

    @field_validator("repo")
    @classmethod
    def _repo_template(cls, value: str) -> str:
        try:
            rendered = value.format(model="m", format="f", FORMAT="F")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad template ({exc}); placeholders: {{model}} {{format}} {{FORMAT}}") from None
        if not _NAME_RE.match(rendered):
            raise ValueError("the rendered repo name may use letters, digits, '.', '_' or '-'")
        return value

    def repo_name(self, model: str, fmt: str) -> str:
        return self.repo.format(model=model, format=fmt, FORMAT=fmt.upper())


class EvaluationSettings(_Strict):
    """`evaluation`: the perplexity / KL smoke test against the source model, and its gates."""

    dataset: str = "builtin"
    ctx: int = Field(512, ge=16, le=32768)
    chunks: int = Field(32, ge=1, le=100000)
    # gates: keys are a format ("gguf") or a format and type ("gguf/Q4_K_M"); the most specific wins
    max_ppl_increase: dict[str, float] = Field(default_factory=dict)
    max_kld: dict[str, float] = Field(default_factory=dict)
    tokenizer_check: bool = True

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        from .data import parse_text_source

        parse_text_source(value)
        return value

    @field_validator("ctx")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (the second half of each window is scored)")
        return value

    @field_validator("max_ppl_increase", "max_kld")
    @classmethod
    def _gate_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for key, limit in value.items():
            fmt, _, qtype = key.partition("/")
            if fmt not in FORMAT_NAMES:
                raise ValueError(f"{key!r}: unknown format {fmt!r} (formats: {', '.join(FORMAT_NAMES)})")
            if qtype and fmt != "gguf":
                raise ValueError(f"{key!r}: {fmt} makes one checkpoint; write {fmt!r} without a type")
            if qtype and fmt == "gguf" and qtype.upper() not in GGUF_TYPES:
                close = difflib.get_close_matches(qtype.upper(), list(GGUF_TYPES), n=1)
                raise ValueError(f"{key!r}: unknown GGUF type" + (f"; did you mean {close[0]!r}?" if close else ""))
            if limit < 0:
                raise ValueError(f"{key!r}: must be >= 0")
        return {(k.split("/")[0] + "/" + k.split("/")[1].upper()) if "/" in k else k: v for k, v in value.items()}

    def gate(self, table: str, fmt: str, qtype: str | None, default: float | None) -> float | None:
        limits = getattr(self, table)
        if qtype and f"{fmt}/{qtype}" in limits:
            return limits[f"{fmt}/{qtype}"]
        return limits.get(fmt, default)


class ModelSettings(_Strict):
    """Everything a model may inherit from `defaults`."""

    revision: str = "main"
    trust_remote_code: bool = False
    allow_patterns: list[str] | None = None
    formats: Formats = Formats()
    publish: PublishTarget = PublishTarget()
    evaluation: EvaluationSettings = EvaluationSettings()
    calibration: CalibrationSettings = CalibrationSettings()

    @field_validator("revision", mode="before")
    @classmethod
    def _revision_is_text(cls, value: Any) -> Any:
        if isinstance(value, int | float):
            raise ValueError("YAML read this revision as a number; put it in quotes")
        return value


class ModelTarget(ModelSettings):
    """One entry of `models`."""

    name: str
    source: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names folders and repos)")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not is_local_source(value) and not _REPO_ID_RE.match(value):
            raise ValueError("expected a Hub repo id (org/name) or a local folder starting with ./, ../, / or ~")
        return value

    @model_validator(mode="after")
    def _has_formats(self) -> ModelTarget:
        if not self.formats.enabled():
            raise ValueError(f"no formats: add formats.<{'|'.join(FORMAT_NAMES)}>")
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

    def model(self, name: str) -> ModelTarget:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


_TOP_KEYS = ("defaults", "models")


def load_targets(path: str | Path) -> Targets:
    """Read and validate a targets file; raise ConfigError listing every problem found."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(shown, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    return parse_targets(text, path)


def parse_targets(text: str, path: Path) -> Targets:
    shown = str(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(shown, line, "", f"not valid YAML: {problem}")]) from None

    lines: dict[tuple, int] = {}
    issues: list[ConfigIssue] = []
    if root is not None:
        _index_lines(root, (), lines, issues, shown)
    if issues:
        raise ConfigError(issues)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(shown, 1, "", "expected a mapping with 'defaults' and 'models'")])

    for key in data:
        if key not in _TOP_KEYS:
            issues.append(ConfigIssue(shown, lines.get((key,)), str(key), _unknown_key_message(key, _TOP_KEYS)))
    defaults = data.get("defaults") or {}
    models_raw = data.get("models")
    if not isinstance(defaults, dict):
        issues.append(ConfigIssue(shown, lines.get(("defaults",)), "defaults", "expected a mapping"))
        defaults = {}
    if not isinstance(models_raw, list) or not models_raw:
        issues.append(ConfigIssue(shown, lines.get(("models",)), "models", "expected a non-empty list of models"))
        models_raw = []

    try:
        ModelSettings.model_validate(defaults)
    except ValidationError as exc:
        issues += _issues_from(exc, ModelSettings, shown, lines, [("defaults",)])

    models: list[ModelTarget] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(models_raw):
        if not isinstance(raw, dict):
            issues.append(ConfigIssue(shown, lines.get(("models", i)), f"models[{i}]", "expected a mapping"))
            continue
        merged = _deep_merge(defaults, raw)
        try:
            model = ModelTarget.model_validate(merged)
        except ValidationError as exc:
            found = _issues_from(exc, ModelTarget, shown, lines, [("models", i), ("defaults",)])
            # a bad default shows up once under defaults, not again for every model
            issues += [f for f in found if f not in issues]
            continue
        if model.name in seen:
            issues.append(ConfigIssue(shown, lines.get(("models", i, "name")), f"models[{i}].name",
                                      f"duplicate model name {model.name!r} (first at models[{seen[model.name]}])"))
            continue
        seen[model.name] = i
        models.append(model)

    if issues:
        raise ConfigError(issues)
    return Targets(path=path.resolve(), models=tuple(models))


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], issues: list[ConfigIssue], shown: str) -> None:
    """Record the 1-based line of every key and list item; flag duplicate keys (PyYAML silently keeps the last)."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            if child in lines:
                issues.append(ConfigIssue(shown, key_node.start_mark.line + 1, _dotted(child),
                                          f"duplicate key (first on line {lines[child]})"))
                continue
            lines[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, lines, issues, shown)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), lines, issues, shown)


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _issues_from(exc: ValidationError, model_cls: type[BaseModel], shown: str, lines: dict[tuple, int],
                 prefixes: list[tuple]) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        prefix, line = _locate(loc, lines, prefixes)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model_cls, loc[:-1])
            message = _unknown_key_message(loc[-1], allowed)
        else:
            message = err["msg"].removeprefix("Value error, ")
        issues.append(ConfigIssue(shown, line, _dotted(prefix + loc), message))
    return issues


def _is_union_tag(part: object) -> bool:
    # pydantic inserts the union member's name (e.g. "GGUFTarget") into locations; it is not a YAML key
    return isinstance(part, str) and part[:1].isupper() and part not in GGUF_TYPES


def _locate(loc: tuple, lines: dict[tuple, int], prefixes: list[tuple]) -> tuple[tuple, int | None]:
    """Find the deepest existing key of `loc`, in the model first, then in the defaults it inherited."""
    for depth in range(len(loc), -1, -1):
        for prefix in prefixes:
            line = lines.get(prefix + loc[:depth])
            if line is not None and (depth > 0 or prefix == prefixes[0]):
                return prefix, line
    return prefixes[0], None


def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> tuple[str, ...]:
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return ()
        cls = _model_in(field.annotation)
    return tuple(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else ()


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _unknown_key_message(key: object, allowed: tuple[str, ...] | list[str]) -> str:
    message = f"unknown key {key!r}"
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    if allowed:
        return f"{message}; allowed: {', '.join(allowed)}"
    return message


def with_publish_to(targets: Targets, to: str) -> Targets:
    """The same targets, every model publishing to `to` (quantforge push --to)."""
    try:
        PublishTarget(to=to)
    except ValidationError as exc:
        raise BadInputError(f"--to {to}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    models = tuple(m.model_copy(update={"publish": m.publish.model_copy(update={"to": to})}) for m in targets.models)
    return Targets(path=targets.path, models=models)
