"""Make quantforge/calibration_mix.json.gz, the `builtin:mix` calibration text, from the packages it quotes:

    pip install gflanguages pyjokes pybind11 rich numpy
    .venv/bin/python scripts/freeze_calibration_mix.py

The snapshot is committed: builds read it, never these packages, so the text (and every calibrated step's key)
does not move with their versions. Rerun this only to change the mix on purpose; the sha256 of the new text then
makes every importance matrix and GPTQ/AWQ checkpoint calibrate again. Licences: NOTICE-calibration-mix.md.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantforge.errors import BadInputError  # noqa: E402
from quantforge.text_mix import MIX_NAME, SNAPSHOT, Block, Mix, Origin, PartInfo, mix_to_json  # noqa: E402

log = logging.getLogger(__name__)

LANGUAGES_IN_TEXT = 40  # the `languages` part: this many, by speakers
LANGUAGES_IN_CHAT = 16  # the `chat` part's Declaration quotes: the next this many
# characters of each language's sample: a share, not the bulk, for an English-centric tokenizer spends up to
# one token per byte on scripts it barely knows (SmolLM2: 1.5 tokens per character of the languages part)
LANGUAGE_CHARS = 800
BLOCK_CHARS = 3000  # code files are cut into blocks of about this size, at blank lines

# (distribution, license as the package declares it)
LICENSES = {"gflanguages": "Apache-2.0", "pyjokes": "BSD-3-Clause", "numpy": "BSD-3-Clause", "pybind11": "BSD-3-Clause",
            "rich": "MIT"}

# code: (language, distribution, candidate paths inside it (the first found is used), at most this many characters)
CODE_FILES: tuple[tuple[str, str, tuple[str, ...], int], ...] = (
    ("Python", "rich", ("rich/table.py",), 30000),
    ("Python", "rich", ("rich/text.py",), 24000),
    ("C", "numpy", ("numpy/_core/include/numpy/npy_math.h", "numpy/core/include/numpy/npy_math.h"), 16000),
    ("C", "numpy", ("numpy/_core/include/numpy/npy_common.h", "numpy/core/include/numpy/npy_common.h"), 14000),
    ("C++", "pybind11", ("pybind11/include/pybind11/stl.h",), 25000),
    ("C++", "pybind11", ("pybind11/include/pybind11/functional.h",), 6000),
    ("C++", "pybind11", ("pybind11/include/pybind11/numpy.h",), 30000),
)
FORTRAN_DIR = ("numpy", "numpy/f2py/tests/src", 12000)  # every .f90 under it, in path order, up to this many

JOKE_LANGUAGES = {"cs": "Czech", "de": "German", "es": "Spanish", "eu": "Basque", "fr": "French", "gl": "Galician",
                  "hu": "Hungarian", "it": "Italian", "lt": "Lithuanian", "pl": "Polish", "ru": "Russian",
                  "sv": "Swedish"}


def _missing(dist: str) -> BadInputError:
    return BadInputError(f"builtin:{MIX_NAME} reads text from the `{dist}` package, which is not installed: "
                         f"install quantforge's dependencies (scripts/bootstrap.sh, or pip install {dist})")


def _origin(dist: str) -> Origin:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(dist) from None
    return Origin(dist, version, LICENSES[dist])


def _locate(dist: str, candidates: Sequence[str]) -> Path | None:
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(dist) from None
    for rel in candidates:
        path = Path(str(found.locate_file(rel)))
        if path.is_file():
            return path
    return None


def _cut(text: str, limit: int) -> list[str]:
    """`text` (at most `limit` characters of it, ending at a line) in blocks of about BLOCK_CHARS, at blank lines
    where there are some."""
    text = text[:limit]
    if len(text) == limit and "\n" in text:
        text = text[:text.rindex("\n")]
    blocks, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) > BLOCK_CHARS:
            blocks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        blocks.append(current)
    return [b.strip("\n") for b in blocks if b.strip()]


# ------------------------------------------------------------------------------------------------ the parts

def _declarations() -> list[tuple[str, str, str]]:
    """(id, name, text) of each language with a sample text in gflanguages, most speakers first; the text is the
    sample's paragraphs (Declaration excerpts), each once."""
    try:
        import gflanguages
    except ImportError:
        raise _missing("gflanguages") from None

    out = []
    for lang in gflanguages.LoadLanguages().values():
        sample = lang.sample_text
        paras: list[str] = []
        for f in ("specimen_16", "specimen_21", "specimen_32", "specimen_36", "specimen_48", "tester"):
            for para in getattr(sample, f).split("\n"):
                para = para.strip()
                if para and not any(para in kept for kept in paras):
                    paras.append(para)
        text = "\n".join(paras)
        if len(text) > LANGUAGE_CHARS:  # whole paragraphs, or the first one cut at a space
            cut = text.rfind("\n", 0, LANGUAGE_CHARS)
            text = text[:cut] if cut > LANGUAGE_CHARS // 2 else text[:text.rfind(" ", 0, LANGUAGE_CHARS)]
        if len(text) >= 150:  # a sentence or more (some samples repeat one sentence), not a few words
            out.append((-lang.population, lang.id, lang.name, text))
    out.sort()
    return [(lid, name, text) for _, lid, name, text in out]


def _jokes(language: str) -> list[str]:
    try:
        from pyjokes import get_jokes
    except ImportError:
        raise _missing("pyjokes") from None
    return get_jokes(language, "all")


def _english(declarations: list[tuple[str, str, str]]) -> tuple[list[Block], PartInfo]:
    jokes = _jokes("en")
    # blocks of a few jokes: a short part still reaches every stretch of the interleaved text
    blocks = [Block("english", "\n".join(jokes[i:i + 4])) for i in range(0, len(jokes), 4)]
    blocks += [Block("english", text) for lid, _, text in declarations if lid == "en_Latn"]
    return blocks, PartInfo("english", "English prose: programmers' one-liners and the UDHR's English excerpt",
                            (_origin("pyjokes"), _origin("gflanguages")), ("English",))


def _languages(declarations: list[tuple[str, str, str]]) -> tuple[list[Block], PartInfo]:
    chosen = [d for d in declarations if d[0] != "en_Latn"][:LANGUAGES_IN_TEXT]
    return ([Block("languages", text) for _, _, text in chosen],
            PartInfo("languages", f"the UDHR's excerpts in the {len(chosen)} most-spoken languages (English aside) "
                     "that gflanguages has a sample text for", (_origin("gflanguages"),),
                     tuple(lid for lid, _, _ in chosen)))


def _code() -> tuple[list[Block], PartInfo]:
    files: list[list[Block]] = []
    used: dict[str, None] = {}
    dists: dict[str, None] = {}
    for language, dist, candidates, limit in CODE_FILES:
        path = _locate(dist, candidates)
        if path is None:  # another version of the package moved it: the record says what was used
            log.warning("builtin:%s: %s has none of %s; leaving it out", MIX_NAME, dist, ", ".join(candidates))
            continue
        files.append([Block("code", b) for b in _cut(path.read_text(encoding="utf-8"), limit)])
        used[language] = None
        dists[dist] = None
    dist, folder, limit = FORTRAN_DIR
    root = Path(str(importlib.metadata.distribution(dist).locate_file(folder)))
    fortran = "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip()
                          for p in sorted(root.rglob("*.f90")))
    if fortran:
        files.append([Block("code", b) for b in _cut(fortran, limit)])
        used["Fortran"] = None
        dists[dist] = None
    blocks = _interleave(files)  # every language in every stretch, not the last files' at the end
    if not blocks:
        raise BadInputError(f"builtin:{MIX_NAME}: none of its source files is installed (rich, numpy, pybind11): "
                            "reinstall quantforge's dependencies")
    return list(blocks), PartInfo("code", "source files of the packages quantforge depends on",
                            tuple(_origin(d) for d in dists), tuple(used))


def _chat(declarations: list[tuple[str, str, str]]) -> tuple[list[Block], PartInfo]:
    kinds: list[list[Block]] = []
    for code, name in JOKE_LANGUAGES.items():
        jokes = _jokes(code)
        kinds.append([])
        for i in range(0, len(jokes) - 2, 3):
            messages = (("user", f"Tell me a programming joke in {name}."), ("assistant", jokes[i]),
                        ("user", "Another one, please."), ("assistant", jokes[i + 1]),
                        ("user", "One more!"), ("assistant", jokes[i + 2]))
            kinds[-1].append(Block("chat", _plain(messages), messages))
    later = [d for d in declarations if d[0] != "en_Latn"][LANGUAGES_IN_TEXT:LANGUAGES_IN_TEXT + LANGUAGES_IN_CHAT]
    kinds.append([])
    for _, name, text in later:
        messages = (("user", f"Quote the Universal Declaration of Human Rights in {name}."), ("assistant", text))
        kinds[-1].append(Block("chat", _plain(messages), messages))
    what = (f"conversations: programming jokes in {len(JOKE_LANGUAGES)} languages, and the UDHR quoted in "
            f"{len(later)} further languages; rendered with the model's chat template when it has one")
    return list(_interleave(kinds)), PartInfo("chat", what, (_origin("pyjokes"), _origin("gflanguages")),
                                              (*JOKE_LANGUAGES, *(lid for lid, _, _ in later)))


def _plain(messages: Sequence[tuple[str, str]]) -> str:
    """A conversation for a model without a chat template: turns as plain text."""
    return "\n".join(f"{role.capitalize()}: {content}" for role, content in messages)


def _interleave(parts: Sequence[list[Block]]) -> tuple[Block, ...]:
    """Every part's blocks spread evenly over the whole: block i of a part of n sits at (i + 0.5) / n."""
    keyed = [((i + 0.5) / len(blocks), p, i, b) for p, blocks in enumerate(parts) for i, b in enumerate(blocks)]
    return tuple(b for *_, b in sorted(keyed, key=lambda k: k[:3]))


def build_mix() -> Mix:
    """The mix, from the installed packages."""
    declarations = _declarations()
    made = [_english(declarations), _languages(declarations), _code(), _chat(declarations)]
    return Mix(_interleave([blocks for blocks, _ in made]), tuple(info for _, info in made))




def main() -> int:
    mix = build_mix()
    with gzip.GzipFile(SNAPSHOT, "wb", mtime=0) as f:  # the same mix gives the same bytes
        f.write(json.dumps(mix_to_json(mix), ensure_ascii=False, sort_keys=True).encode())
    print(f"{SNAPSHOT.relative_to(REPO)}: {len(mix.blocks)} blocks, {len(mix.text())} characters, "
          f"{SNAPSHOT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
