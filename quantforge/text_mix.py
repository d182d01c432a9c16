"""`builtin:mix`: the default calibration text, assembled from license-clean text that ships inside packages on the
package index, frozen into quantforge (calibration_mix.json.gz, made by scripts/freeze_calibration_mix.py): no
download at build time, and the same text whatever versions of those packages a machine has (the text is part of
every calibrated step's key: a plan job and a build leg must read the same one).

    english    English prose: programmers' one-liners (pyjokes, BSD-3-Clause) and the English excerpt of the
               Universal Declaration of Human Rights (gflanguages, Apache-2.0)
    languages  the Declaration's excerpts in the most-spoken languages gflanguages has a sample text for, English
               aside: Latin, Cyrillic, Han, Kana, Hangul, Arabic, Devanagari, Bengali, Tamil, Thai, Ethiopic...
    code       source files of Python, C, C++ and Fortran from rich, numpy and pybind11
    chat       conversations (jokes in twelve languages, the Declaration in further languages), rendered through
               the source model's chat template when it has one (steps/calibration.py), else as plain turns

Why a mix: an importance matrix (and GPTQ/AWQ) weights each column by the activations the calibration text causes,
so a text of one domain tunes the model to that domain; llama.cpp's uploaders calibrate on mixed text. The parts
are interleaved block by block, each spread evenly over the text, so that any stretch of it (calibration windows
come from its end) holds every part in its share.

The evaluation default (`builtin`: Python's documentation topics) is none of these domains.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MIX_NAME = "mix"
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Origin:
    """A package some of a part's text comes from."""

    package: str
    version: str
    license: str

    def to_json(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "license": self.license}


@dataclass(frozen=True)
class Block:
    """One stretch of the mix: plain text, or (the chat part) a conversation whose `text` is its plain rendering."""

    part: str
    text: str
    messages: tuple[tuple[str, str], ...] = ()  # (role, content), for the chat template


@dataclass(frozen=True)
class PartInfo:
    name: str
    description: str
    origins: tuple[Origin, ...]
    contents: tuple[str, ...] = ()  # e.g. the programming languages or natural languages it holds


@dataclass(frozen=True)
class Mix:
    blocks: tuple[Block, ...]
    parts: tuple[PartInfo, ...]

    def conversations(self) -> list[list[dict[str, str]]]:
        """The chat blocks' conversations, in order, as chat templates take them."""
        return [[{"role": r, "content": c} for r, c in b.messages] for b in self.blocks if b.messages]

    def texts(self, rendered: Sequence[str] | None = None) -> list[str]:
        """Each block's text; `rendered`: the conversations through a chat template, in order (None: plain)."""
        chats = iter(rendered) if rendered is not None else None
        out = [next(chats) if (chats is not None and b.messages) else b.text for b in self.blocks]
        return [t + SEPARATOR if i < len(out) - 1 else t for i, t in enumerate(out)]

    def text(self, rendered: Sequence[str] | None = None) -> str:
        return "".join(self.texts(rendered))


SNAPSHOT = Path(__file__).parent / "calibration_mix.json.gz"


def _origins(data: list[dict[str, str]]) -> tuple[Origin, ...]:
    return tuple(Origin(o["package"], o["version"], o["license"]) for o in data)


@functools.cache
def build_mix() -> Mix:
    """The mix, from the snapshot shipped with quantforge."""
    with gzip.open(SNAPSHOT, "rt", encoding="utf-8") as f:
        data = json.load(f)
    blocks = tuple(Block(b["part"], b["text"], tuple((r, c) for r, c in b.get("messages", ()))) for b in data["blocks"])
    parts = tuple(PartInfo(p["name"], p["description"], _origins(p["sources"]), tuple(p["contents"]))
                  for p in data["parts"])
    return Mix(blocks, parts)


def mix_to_json(mix: Mix) -> dict[str, object]:
    """What the snapshot holds (scripts/freeze_calibration_mix.py writes it)."""
    return {"blocks": [{"part": b.part, "text": b.text, **({"messages": [list(m) for m in b.messages]}
                                                           if b.messages else {})} for b in mix.blocks],
            "parts": [{"name": p.name, "description": p.description, "sources": [o.to_json() for o in p.origins],
                       "contents": list(p.contents)} for p in mix.parts]}


def makeup(mix: Mix, tokens: Sequence[int] | None = None, window_tokens: Sequence[int] | None = None,
           rendered: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Each part as the record names it: origins, characters and their share; with `tokens` (per block, under the
    model's tokenizer) and `window_tokens` (per block, inside the calibration windows), tokens and their shares."""
    texts = mix.texts(rendered)
    out = []
    total_chars = sum(map(len, texts))
    total_tokens = sum(tokens) if tokens is not None else 0
    total_window = sum(window_tokens) if window_tokens is not None else 0
    for info in mix.parts:
        idx = [i for i, b in enumerate(mix.blocks) if b.part == info.name]
        chars = sum(len(texts[i]) for i in idx)
        entry: dict[str, object] = {"name": info.name, "description": info.description,
                                    "sources": [o.to_json() for o in info.origins], "contents": list(info.contents),
                                    "characters": chars, "characters_share": round(chars / total_chars, 4)}
        if tokens is not None:
            n = sum(tokens[i] for i in idx)
            entry |= {"tokens": n, "tokens_share": round(n / total_tokens, 4) if total_tokens else 0.0}
        if window_tokens is not None:
            n = sum(window_tokens[i] for i in idx)
            entry |= {"window_tokens": n, "window_share": round(n / total_window, 4) if total_window else 0.0}
        out.append(entry)
    return out
