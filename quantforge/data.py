"""Text for evaluation and calibration, and the token windows cut from it.

Sources, as written in targets.yaml:
    builtin                              Python's own documentation topics (pydoc_data): offline, no download;
                                         the evaluation's default
    builtin:mix                          English prose, several languages and scripts, code, chat turns, taken
                                         from packages on the index and shipped frozen (text_mix.py): the
                                         calibration's default
    file:PATH[,PATH...]                  local text files (relative to the targets file)
    hf:REPO:CONFIG:SPLIT:COLUMN          a Hub dataset through the `datasets` library (CONFIG may be empty)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError

# builtin texts by name ("" is plain `builtin`)
BUILTIN_TEXTS = {"": "Python's documentation topics", "mix": "English prose, several languages and scripts, code "
                 "and chat turns (text_mix.py)"}


@dataclass(frozen=True)
class TextSource:
    kind: str  # builtin | file | hf
    name: str = ""  # a builtin text's: "" (the documentation topics) or "mix"
    paths: tuple[str, ...] = ()
    repo: str = ""
    config: str | None = None
    split: str = ""
    column: str = ""


def parse_text_source(spec: str) -> TextSource:
    kind, _, rest = spec.partition(":")
    if kind == "builtin":
        if spec == "builtin" or (rest and rest in BUILTIN_TEXTS):
            return TextSource("builtin", name=rest)
        known = ", ".join(f"builtin{':' + n if n else ''} ({what})" for n, what in BUILTIN_TEXTS.items())
        raise ValueError(f"no builtin text {rest!r}; there are {known}")
    if kind == "file" and rest:
        return TextSource("file", paths=tuple(p.strip() for p in rest.split(",") if p.strip()))
    if kind == "hf":
        parts = rest.split(":")
        if len(parts) == 4 and parts[0] and parts[2] and parts[3]:
            return TextSource("hf", repo=parts[0], config=parts[1] or None, split=parts[2], column=parts[3])
        raise ValueError("expected hf:REPO:CONFIG:SPLIT:COLUMN (CONFIG may be empty: hf:REPO::SPLIT:COLUMN)")
    raise ValueError("expected builtin, builtin:mix, file:PATH[,PATH...] or hf:REPO:CONFIG:SPLIT:COLUMN")


def resolve_paths(source: TextSource, base_dir: Path) -> TextSource:
    """Make file paths absolute (relative to the targets file), so a spec means one thing everywhere."""
    if source.kind != "file":
        return source
    paths = tuple(str(p if Path(p).is_absolute() else (base_dir / p).resolve())
                  for p in (Path(x).expanduser() for x in source.paths))
    return TextSource("file", paths=paths)


def load_text(source: TextSource) -> str:
    if source.kind == "builtin" and source.name == "mix":
        from .text_mix import build_mix

        return build_mix().text()  # chat turns as plain text: the calibration step renders them per model
    if source.kind == "builtin":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[name].strip() for name in sorted(topics))
    if source.kind == "file":
        texts = []
        for path in source.paths:
            try:
                texts.append(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise BadInputError(f"text file {path}: {exc}") from None
        return "\n\n".join(texts)
    return _load_hub_dataset(source)


def _load_hub_dataset(source: TextSource) -> str:
    try:
        import datasets
    except ImportError:
        raise BadInputError("hf: text sources need the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(source.repo, source.config, split=source.split)
    except Exception as exc:  # datasets raises many types; all mean "cannot load it"
        raise BadInputError(f"hf:{source.repo}: cannot load split {source.split!r}: {exc}") from None
    if source.column not in ds.column_names:
        raise BadInputError(f"hf:{source.repo}: no column {source.column!r} (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds[source.column] if t and t.strip())


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def portable_path(written: str) -> str:
    """A path as a cache key holds it: as written in the targets file (relative to it, absolute, or ~/...),
    normalized but never resolved against this machine's folders, so the same targets file gives the same keys in
    any checkout, for any user."""
    return Path(os.path.normpath(written)).as_posix()


@dataclass(frozen=True)
class TextIdentity:
    """A text as a step names it. `spec` and `digest` go in the key: local files by their paths as written and
    their content, a Hub dataset by its spec (reading it would mean downloading it). `local` is the spec with
    absolute paths, for the run function (Step.local): it differs between machines and is not keyed."""

    spec: str
    digest: str | None
    local: str


def text_identity(dataset: str, base_dir: Path, memo: Callable[[str, Callable[[], str]], str]) -> TextIdentity:
    parsed = parse_text_source(dataset)
    source = resolve_paths(parsed, base_dir)
    digest = None if source.kind == "hf" else memo(f"text:{source}", lambda: text_digest(load_text(source)))
    if source.kind != "file":
        return TextIdentity(dataset, digest, dataset)
    return TextIdentity("file:" + ",".join(portable_path(p) for p in parsed.paths), digest,
                        "file:" + ",".join(source.paths))


def cut_windows(ids: list[int], ctx: int, chunks: int, bos_id: int | None) -> np.ndarray:
    """`chunks` consecutive windows of `ctx` tokens; the first token of each is BOS when the model has one
    (as llama.cpp's perplexity tool does), so every runtime sees exactly these ids."""
    needed = ctx * chunks
    if len(ids) < needed:
        raise BadInputError(f"evaluation text has {len(ids)} tokens; ctx {ctx} x chunks {chunks} needs {needed}: "
                            "lower chunks or add text")
    windows = np.asarray(ids[:needed], dtype=np.int32).reshape(chunks, ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def cut_calibration(ids: list[int], seq_len: int, samples: int, bos_id: int | None, *,
                    after: int = 0) -> tuple[np.ndarray, int]:
    """`samples` windows of `seq_len` tokens for calibration, taken from the *end* of the text, so that with the
    same text for both they do not overlap the evaluation windows (taken from the start). `after`: the tokens the
    evaluation windows take when the text is the same; a text too short to leave them alone is refused, since a
    model calibrated on the windows it is scored on would look better than it is. Returns the windows and the
    index of the first token used."""
    needed = seq_len * samples
    if len(ids) < needed + after:
        what = (f"{needed} after the {after} the evaluation windows take (ctx x chunks): lower samples or chunks, "
                "add text, or calibrate on another text") if after else f"{needed}: lower samples or add text"
        raise BadInputError(f"calibration text has {len(ids)} tokens; samples {samples} x seq_len {seq_len} needs "
                            + what)
    first = len(ids) - needed
    windows = np.asarray(ids[first:], dtype=np.int32).reshape(samples, seq_len)
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows, first
