"""Reading targets.yaml: YAML to validated `Targets`, every problem located by file, line and key path.

`defaults` are deep-merged into every model before validation, so a model states only what differs. An error
in a value that came from `defaults` points at the line in `defaults`. Unknown keys are errors with a "did you
mean" suggestion. The formats a file may name are given by the caller (the assembler knows them), so this
module knows no format. Any input, however broken or hostile, gives Targets or a ConfigError (yaml_safe.py
bounds what the YAML may expand to).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model

from ..errors import ConfigError, ConfigIssue
from .schema import MAX_NAME, Formats, FormatSettings, ModelSettings, ModelTarget, Targets, format_settings
from .yaml_safe import MAX_VALUES, Index, Lines, decode, dotted, load_yaml, read_bytes, short

FormatModels = Mapping[str, type[FormatSettings]]

_TOP_KEYS = ("defaults", "models")
# defaults are validated once per model: bound that work as the YAML reader bounds the values themselves
_MAX_MERGED_VALUES = 5 * MAX_VALUES
# the Hub also refuses these in a repo id's parts (huggingface_hub.utils.validate_repo_id)
_HUB_REFUSES = re.compile(r"--|\.\.|^[-.]|[-.]$|\.git$")
# nobody reads ten thousand errors, and "did you mean" costs ~50us each: the first ones, then a note
MAX_ISSUES = 100


def load_targets(path: str | Path, formats: FormatModels | None = None) -> Targets:
    """Read and validate a targets file; raise ConfigError listing every problem found. `formats`: format
    name -> its settings model, the formats the file may ask for (default: every registered one)."""
    path = Path(path)
    return parse_targets(read_bytes(path, str(path)), path, formats)


@lru_cache(maxsize=8)
def schema_for(formats: tuple[tuple[str, type[FormatSettings]], ...]) -> tuple[type[ModelSettings], type[ModelTarget]]:
    """ModelSettings and ModelTarget with a `formats` block that has one optional field per format."""
    fields: dict[str, Any] = {name: (model | None, None) for name, model in formats}
    formats_model = create_model("Formats", __base__=Formats, **fields)
    described = ModelSettings.model_fields["formats"].description  # the JSON Schema and docs show it
    settings = create_model("ModelSettings", __base__=ModelSettings,
                            formats=(formats_model, Field(formats_model(), description=described)))
    target = create_model("ModelTarget", __base__=ModelTarget,
                          formats=(formats_model, Field(formats_model(), description=described)))
    return settings, target


def parse_targets(text: str | bytes, path: Path, formats: FormatModels | None = None) -> Targets:
    shown = str(path)
    settings_model, target_model = schema_for(tuple((formats or format_settings()).items()))
    data, lines = load_yaml(decode(text, shown) if isinstance(text, bytes) else text, shown)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(shown, 1, "", "expected a mapping with 'defaults' and 'models'")])

    found = _Issues()
    for key in data:
        if key not in _TOP_KEYS and not found.skip(shown, _line(lines, (key,))):
            found.add(ConfigIssue(shown, _line(lines, (key,)), dotted((key,)), _unknown_key_message(key, _TOP_KEYS)))
    defaults = data.get("defaults")
    models_raw = data.get("models")
    if defaults is None:  # absent, or `defaults:` with nothing under it
        defaults = {}
    elif not isinstance(defaults, dict):
        found.add(ConfigIssue(shown, _line(lines, ("defaults",)), "defaults", "expected a mapping"))
        defaults = {}
    if not isinstance(models_raw, list) or not models_raw:
        found.add(ConfigIssue(shown, _line(lines, ("models",)), "models", "expected a non-empty list of models"))
        models_raw = []
    merged_size = _size(defaults) * len(models_raw)
    if merged_size > _MAX_MERGED_VALUES:
        found.add(ConfigIssue(shown, _line(lines, ("defaults",)), "defaults",
                              f"{len(models_raw)} models each inheriting these defaults make {merged_size} values "
                              f"to check (at most {_MAX_MERGED_VALUES}); keep large settings out of defaults"))
        raise ConfigError(found.report())

    try:
        settings_model.model_validate(defaults)
    except ValidationError as exc:
        _issues_from(found, exc, settings_model, shown, lines, [("defaults",)], defaults)

    models: list[tuple[int, ModelTarget]] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(models_raw):
        if not isinstance(raw, dict):
            found.add(ConfigIssue(shown, _line(lines, ("models", Index(i))), f"models[{i}]", "expected a mapping"))
            continue
        merged = _deep_merge(defaults, raw)
        try:
            model = target_model.model_validate(merged)
        except ValidationError as exc:
            # a bad default shows up once under defaults, not again for every model (_Issues drops repeats)
            _issues_from(found, exc, target_model, shown, lines, [("models", Index(i)), ("defaults",)], merged)
            continue
        if model.name in seen:
            found.add(ConfigIssue(shown, _line(lines, ("models", Index(i), "name")), f"models[{i}].name",
                                  f"duplicate model name {model.name!r} (first at models[{seen[model.name]}])"))
            continue
        seen[model.name] = i
        models.append((i, model))
    for issue in _repo_issues(models, path, shown, lines):
        found.add(issue)

    if found.issues:
        raise ConfigError(found.report())
    return Targets(path=path.resolve(), models=tuple(m for _, m in models))


class _Issues:
    """The issues found so far, each once, in order (a set: a bad default can fail thousands of models), at
    most MAX_ISSUES of them."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []
        self._seen: set[ConfigIssue] = set()
        self._more: tuple[str, int | None] | None = None  # where the first one not shown is

    @property
    def full(self) -> bool:
        return len(self.issues) >= MAX_ISSUES

    def skip(self, file: str, line: int | None) -> bool:
        """True when full: then the caller need not build the issue's message; this notes where more start."""
        if not self.full:
            return False
        self._more = self._more or (file, line)
        return True

    def add(self, issue: ConfigIssue) -> None:
        if issue not in self._seen and not self.skip(issue.file, issue.line):
            self._seen.add(issue)
            self.issues.append(issue)

    def report(self) -> list[ConfigIssue]:
        if self._more is None:
            return self.issues
        return [*self.issues, ConfigIssue(*self._more, "", f"more problems from here on (the first {MAX_ISSUES} "
                                          "are shown)")]


def _repo_issues(models: list[tuple[int, ModelTarget]], path: Path, shown: str, lines: Lines) -> list[ConfigIssue]:
    """Each (model, format) publishes one repo: its rendered name must fit the Hub's limit, and two must not
    land in the same repo of the same destination (the second would overwrite the first)."""
    issues = []
    taken: dict[tuple[str, str], tuple[int, str, str]] = {}  # -> (model index, format, repo id)
    for i, model in models:
        publish = model.publish
        template_line = (_locate(("publish", "repo"), lines, [("models", Index(i)), ("defaults",)])[1]
                         or _model_line(lines, i))
        key_path = f"models[{i}].publish.repo"
        destination = "hub" if publish.folder is None else _folder(path, publish.folder)
        for fmt in model.formats.enabled():
            name = publish.repo_name(model.name, fmt, model.formats.settings(fmt).repo_label())
            repo = f"{publish.namespace}/{name}"
            if len(name) > MAX_NAME:
                issues.append(ConfigIssue(shown, template_line, key_path, f"renders to a repo name of {len(name)} "
                                          f"characters for {fmt}; at most {MAX_NAME} (the Hub's limit)"))
                continue
            if destination == "hub" and any(_HUB_REFUSES.search(part) for part in (publish.namespace, name)):
                issues.append(ConfigIssue(shown, template_line, key_path, f"renders to {repo}, which the Hub "
                                          "refuses: no '--' or '..', no '-' or '.' first or last, no '.git' last"))
                continue
            # the Hub ignores case in repo ids, and so do the folders of macOS and Windows
            key = (destination, repo.lower())
            if key not in taken:
                taken[key] = (i, fmt, repo)
                continue
            j, other_fmt, other_repo = taken[key]
            if j == i:
                issues.append(ConfigIssue(shown, template_line, key_path, f"renders to {repo} for both "
                                          f"{other_fmt} and {fmt}; put {{format}} or {{FORMAT}} in it"))
            else:
                case = "" if other_repo == repo else f" as {other_repo} (the same repo: case is ignored)"
                issues.append(ConfigIssue(shown, _model_line(lines, i), key_path, f"renders to {repo}, which "
                                          f"models[{j}] (line {_model_line(lines, j)}) also publishes to{case}"))
    return issues


def _model_line(lines: Lines, i: int) -> int:
    """The line that decides a model's repo: its own `publish.repo`, else its name."""
    for path in (("models", Index(i), "publish", "repo"), ("models", Index(i), "name")):
        if path in lines:
            return lines[path]
    return _line(lines, ("models", Index(i)))


def _folder(path: Path, where: str) -> str:
    """A dir: destination as one absolute path, relative to the targets file as the publisher resolves it."""
    try:
        return str((path.parent / Path(where).expanduser()).resolve())
    except (OSError, RuntimeError):  # no home directory, a symlink loop: compare it as written
        return str((path.parent / where).absolute())


# a model's own runner replaces the default one whole: sizes declared for one runner do not hold for another
_NOT_MERGED = frozenset({"runner"})


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _NOT_MERGED:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _size(value: Any) -> int:
    """Values in `value`, aliases expanded (bounded: the YAML reader refused more than MAX_VALUES)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return count


def _line(lines: Lines, path: tuple) -> int:
    """The line of `path`, or of its nearest ancestor in the file (a missing key has no line of its own)."""
    for depth in range(len(path), -1, -1):
        line = lines.get(path[:depth])
        if line is not None:
            return line
    return 1


def _issues_from(found: _Issues, exc: ValidationError, model_cls: type[BaseModel], shown: str, lines: Lines,
                 prefixes: list[tuple], data: Any) -> None:
    for err in exc.errors(include_url=False, include_input=False):
        loc = _key_path(err["loc"], data, err["type"] == "missing")
        prefix, line = _locate(loc, lines, prefixes)
        line = line or _line(lines, prefixes[0])
        if found.full:
            if prefix == prefixes[0]:  # one located in defaults repeats one from validating the defaults
                found.skip(shown, line)
            continue
        if err["type"] in ("extra_forbidden", "invalid_key") and loc:  # invalid_key: a key that is not text
            message = _unknown_key_message(loc[-1], _allowed_keys(model_cls, loc[:-1]))
        else:
            message = err["msg"].removeprefix("Value error, ")
        found.add(ConfigIssue(shown, line, dotted(prefix + loc), message))


def _key_path(loc: tuple, data: Any, missing: bool) -> tuple:
    """The YAML keys and list indices in a pydantic error location. pydantic adds parts that are no keys (the
    union member tried, '[key]', a validator's name): a part is a key when the input has it at that point of
    the data, or when it names the missing field (the last part of a `missing` error)."""
    out: list[Any] = []
    node = data
    for n, part in enumerate(loc):
        if isinstance(node, dict):
            key = part if part in node else _non_text_key(node, part)
            if key is not _ABSENT:
                out.append(key)
                node = node[key]
                continue
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(Index(part))
            node = node[part]
            continue
        if missing and n == len(loc) - 1:
            out.append(part)
    return tuple(out)


_ABSENT = object()


def _non_text_key(mapping: dict, part: object) -> Any:
    """pydantic names a key YAML read as null, a float or a date by its str(): find the key itself."""
    if isinstance(part, str) and part[:1] != "[":
        for key in mapping:
            if not isinstance(key, str) and str(key) == part:
                return key
    return _ABSENT


def _locate(loc: tuple, lines: Lines, prefixes: list[tuple]) -> tuple[tuple, int | None]:
    """Find the deepest existing key of `loc`, in the model first, then in the defaults it inherited."""
    for depth in range(len(loc), -1, -1):
        for prefix in prefixes:
            line = lines.get(prefix + loc[:depth])
            if line is not None and (depth > 0 or prefix == prefixes[0]):
                return prefix, line
    return prefixes[0], None


def _allowed_keys(model_cls: type[BaseModel], loc: tuple) -> tuple[str, ...]:
    cls: Any = model_cls
    named = False  # the last field was a mapping of models: the next part is a name of the user's, not a field
    for part in loc:
        if isinstance(part, int) or named:
            named = False
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return ()
        named = typing.get_origin(field.annotation) is dict
        cls = _model_in(field.annotation)
    return tuple(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else ()


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is dict:
        return _model_in(typing.get_args(annotation)[1])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _unknown_key_message(key: object, allowed: tuple[str, ...] | list[str]) -> str:
    message = f"unknown key {short(repr(key))}"
    same_case = [a for a in allowed if a.lower() == str(key).lower()]  # CTX: did you mean 'ctx'?
    close = same_case or difflib.get_close_matches(str(key), list(allowed), n=1)
    if close:
        return f"{message}; did you mean {close[0]!r}?"
    if allowed:
        return f"{message}; allowed: {', '.join(allowed)}"
    return message
