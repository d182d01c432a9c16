"""The building blocks of targets.yaml's models: the strict base model, and the checks of names and texts."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from ..data import parse_text_source
from .text import visible

# used with fullmatch: `$` would also match before a final newline, and "a\n" would name a folder
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The Hub's limit for a repo's name and for a namespace. It also keeps file names short enough: the longest
# that quantforge derives from a model name, <name>-<TYPE>-00001-of-00009.gguf (a split shard), is 96 + 28
# bytes, and the filesystem allows 255.
MAX_NAME = 96


def check_name(value: str, what: str) -> str:
    """A name that becomes a folder and part of a repo id: ASCII letters, digits, '.', '_', '-'; at most 96."""
    visible(value)
    if not NAME_RE.fullmatch(value):
        raise ValueError(f"use letters, digits, '.', '_' or '-' ({what})")
    if len(value) > MAX_NAME:
        raise ValueError(f"{len(value)} characters; at most {MAX_NAME} ({what}; the Hub's limit, and it keeps "
                         "file names under the filesystem's 255 bytes)")
    return value


class Strict(BaseModel):
    # strict: YAML gives numbers and booleans their own types, so a quoted "512" or a `true` where a number
    # belongs is a mistake to name, not to convert (lax mode read `max_kld: {gguf: true}` as a limit of 1.0);
    # the JSON Schema (`quantforge schema`) then says exactly what the loader accepts
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def text_source(value: str) -> str:
    visible(value)  # a NUL in a path makes open() raise ValueError at build time
    source = parse_text_source(value)  # ValueError says which forms are accepted
    if source.kind == "file" and not source.paths:
        raise ValueError("file: names no file; expected file:PATH[,PATH...]")
    return value


TextSpec = Annotated[str, AfterValidator(text_source)]  # builtin | file:PATH[,PATH] | hf:REPO:CONFIG:SPLIT:COLUMN
