"""YAML for untrusted targets files: bytes in, plain Python data and the line of every key out, or a ConfigError.

PyYAML alone is not safe against hostile or broken input: it decodes only UTF-8 strictly, its composer recurses
once per nesting level (RecursionError at ~300), it accepts self-referencing aliases (`a: &a [*a]`, which every
walk over the data then follows forever), and a few hundred bytes of nested aliases (billion laughs) expand to
billions of values in any code that walks the result. So the composer here counts, while it builds the node
graph and before any Python object exists: nesting depth, and the values each alias stands for, and refuses
cycles. Everything downstream then walks at most MAX_VALUES values, at most MAX_DEPTH deep.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from ..errors import ConfigError, ConfigIssue

# A real targets file is a few KB, ~6 levels deep and a few hundred values; these bounds are far above that
# and keep validating any file under a second (composing is Python: ~100k values/s over libyaml's events).
MAX_BYTES = 256 * 1024
MAX_DEPTH = 48
MAX_VALUES = 20_000

Lines = dict[tuple, int]  # key path (keys as YAML read them, list indices as Index) -> 1-based line


class Index(int):
    """A list index in a key path: models[0]. A plain int there is a mapping key that YAML read as a number
    (equal and hashing alike, so either finds the line)."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """Input this module will not expand (too deep, too large once aliases are expanded, cyclic)."""


class _Guarded(Composer, SafeConstructor, Resolver):
    """A safe loader, less its event source, whose composer bounds depth and expanded size and refuses cyclic
    aliases. A subclass adds the event source: libyaml's parser, or PyYAML's pure-Python one where PyYAML was
    built without libyaml (5x slower)."""

    def _guard(self) -> None:
        self._frames: list[list[int]] = [[0, 0]]  # per node being composed: [values under it, its height]
        self._open: set[str] = set()  # anchors whose node is being composed: an alias to one is a cycle
        self._expanded: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) it stands for
        self._total = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        depth = len(self._frames)  # the root is at depth 1
        if isinstance(event, AliasEvent):
            if event.anchor in self._open:
                raise _Refused(None, None, f"alias *{event.anchor} refers to a value that contains it (a cycle)",
                               event.start_mark)
            if event.anchor in self._expanded:  # an undefined one: PyYAML's own error below
                values, height = self._expanded[event.anchor]
                frame = self._frames[-1]
                frame[0] += values
                frame[1] = max(frame[1], height + 1)
                self._check(values, depth + height, event, " once aliases are expanded")
            return super().compose_node(parent, index)
        self._check(1, depth, event, "")
        if event.anchor is not None:
            self._open.add(event.anchor)
        self._frames.append([1, 0])
        node = super().compose_node(parent, index)  # its children come back through this method
        values, height = self._frames.pop()
        if event.anchor is not None:
            self._open.discard(event.anchor)
            self._expanded[event.anchor] = (values, height)
        frame = self._frames[-1]
        frame[0] += values
        frame[1] = max(frame[1], height + 1)
        return node

    def _check(self, values: int, deepest: int, event: Any, why: str) -> None:
        self._total += values
        if self._total > MAX_VALUES:
            hint = " (an alias bomb?)" if why else "; a targets file has hundreds"
            raise _Refused(None, None, f"more than {MAX_VALUES} values{why}{hint}", event.start_mark)
        if deepest > MAX_DEPTH:
            raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep{why}", event.start_mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            # e.g. a date that does not exist (2024-02-30) or an integer with too many digits
            raise ConstructorError(None, None, f"cannot read {short(node.value)}: {exc}", node.start_mark) from None


# YAML 1.1 (PyYAML) reads 1e-3 as a string: only 1.0e-3 is a float there. YAML 1.2, and anyone writing a gate,
# means a number
_Guarded.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))


class _PyLoader(_Guarded, Reader, Scanner, Parser):
    def __init__(self, text: str):
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._guard()


_CParser: Any
try:
    from yaml.cyaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml
    _CParser = None
if _CParser is not None:
    class _CLoader(_Guarded, _CParser):
        def __init__(self, text: str):
            _CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._guard()


def read_bytes(path: Path, shown: str) -> bytes:
    """The file's bytes, refusing what cannot be a targets file before reading all of it."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        message = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([ConfigIssue(shown, None, "", f"cannot read: {message}")]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError([ConfigIssue(shown, None, "", f"larger than {MAX_BYTES // 1024} KB, the limit for a targets "
                                       "file (a real one is a few KB): the limit keeps a file given by mistake, such "
                                       "as a model or a log, from being read whole and parsed")])
    return raw


def decode(raw: bytes, shown: str) -> str:
    """UTF-8 (a BOM is allowed), or UTF-16 with its BOM as YAML allows; an error names the line of the bad byte."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue(shown, 1, "", "not valid UTF-16 text")]) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue(shown, line, "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be "
                                       "decoded; save the file as UTF-8")]) from None


def load_yaml(text: str, shown: str, *, libyaml: bool = True) -> tuple[Any, Lines]:
    """The document as Python data, and the line of every key and list item; ConfigError for invalid or refused
    YAML and for duplicate keys (PyYAML silently keeps the last). `libyaml`: parse with it when PyYAML has it."""
    bad = Reader.NON_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError([ConfigIssue(shown, line, "", f"character U+{ord(bad.group()):04X} is not allowed in "
                                       "YAML; write it as an escape in a double-quoted string")])
    loader = _CLoader(text) if libyaml and _CParser is not None else _PyLoader(text)
    try:
        root = loader.get_single_node()
        lines: Lines = {}
        issues: list[ConfigIssue] = []
        if root is not None:  # lines first: constructing flattens `<<` merge keys into the mappings
            _index_lines(loader, root, (), lines, issues, shown)
        data = loader.construct_document(root) if root is not None else None
    except _Refused as exc:
        raise ConfigError([ConfigIssue(shown, _line(exc), "", f"refused: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(shown, _line(exc), "", f"not valid YAML: {_problem(exc)}")]) from None
    finally:
        loader.dispose()
    if issues:
        raise ConfigError(issues)
    return data, lines


def _problem(exc: yaml.YAMLError) -> str:
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    if not problem:
        return str(exc)
    mark = getattr(exc, "context_mark", None)
    return f"{problem} ({context}{f' on line {mark.line + 1}' if mark else ''})" if context else problem


def _line(exc: yaml.YAMLError) -> int:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark else 1


def _index_lines(loader: _Guarded, node: yaml.Node, path: tuple, lines: Lines, issues: list[ConfigIssue],
                 shown: str) -> None:
    """Record the line of every key and list item under `path`, keyed as the data is (`1`, `true` and `"1"` are
    three keys), and flag duplicate keys. Keys merged in with `<<: *anchor` get the line that defines them."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            child = (*path, _key(loader, key_node))
            if child in lines:
                issues.append(ConfigIssue(shown, key_node.start_mark.line + 1, dotted(child),
                                          f"duplicate key (first on line {lines[child]})"))
                continue
            lines[child] = key_node.start_mark.line + 1
            _index_lines(loader, value_node, child, lines, issues, shown)
        # explicit keys win, then the first merged mapping, as PyYAML merges; a merged key is no duplicate
        for key_node, value_node in _merged(node):
            child = (*path, _key(loader, key_node))
            if child not in lines:
                lines[child] = key_node.start_mark.line + 1
                _index_lines(loader, value_node, child, lines, [], shown)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(loader, item, (*path, Index(i)), lines, issues, shown)


def _merged(node: yaml.MappingNode) -> Iterator[tuple[yaml.Node, yaml.Node]]:
    """The (key, value) pairs `<<: *anchor` merges into `node` (the composer refused cycles)."""
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if isinstance(source, yaml.MappingNode):
                    yield from ((k, v) for k, v in source.value if k.tag != _MERGE_TAG)
                    yield from _merged(source)


def _key(loader: _Guarded, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):  # PyYAML would refuse it too, as unhashable, but later
        raise ConstructorError(None, None, "a key must be a plain value, not a list or mapping", node.start_mark)
    return loader.construct_object(node, deep=True)


def dotted(path: tuple) -> str:
    """A key path as the user reads it: models[0].formats.gguf."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, Index) else (f".{short(part)}" if out else short(part))
    return out


def short(value: object, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}..."
