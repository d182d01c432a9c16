"""The source's tokenizer (transformers' AutoTokenizer) in a served child process.

    python -m quantforge.toolchains.tokenizer_worker --result FILE tokenize SRC --texts JSON
    python -m quantforge.toolchains.tokenizer_worker --result FILE chat SRC --messages JSON
    python -m quantforge.toolchains.tokenizer_worker --result FILE chats SRC --conversations JSON

Why a child: loading a tokenizer through transformers imports torch, which costs the process that does it about
2 s to import, 0.4 GB resident and most of a second to exit. In a served worker (worker.ServedWorker) one build
pays the import once, for its evaluation windows, calibration windows and card examples, and the build process
itself never holds torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantforge.errors import SourceError
from quantforge.toolchains.worker import run_worker, serve

WORKER = "quantforge.toolchains.tokenizer_worker"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "tokenizer.model", "merges.txt")


@dataclass(frozen=True)
class Tokenized:
    ids: list[list[int]]  # per text, without special tokens
    bos_id: int | None  # the tokenizer's BOS token
    adds_bos: bool  # whether the tokenizer itself prepends it (see bos_added)

    @property
    def window_bos(self) -> int | None:
        """The id each window starts with: BOS when the tokenizer adds one (as llama.cpp does), else none."""
        return self.bos_id if self.adds_bos else None


# ------------------------------------------------------------------------------------------ parent side

def tokenize(source_dir: Path, texts: list[str], scratch: Path, log_path: Path) -> Tokenized:
    """Token ids of each text under the source's tokenizer; SourceError naming a broken tokenizer file."""
    result = _ask("tokenize", source_dir, "--texts", {"texts": texts}, scratch, log_path)
    return Tokenized(result["ids"], result["bos_id"], result["adds_bos"])


def chat_example(source_dir: Path, messages: list[dict[str, str]]) -> str | None:
    """The source's chat template applied by transformers to `messages`; None when it does not render (a
    template that needs tools, a date or remote code)."""
    with tempfile.TemporaryDirectory(prefix="quantforge-chat-") as scratch:
        request = Path(scratch) / "messages.json"
        request.write_text(json.dumps(messages, ensure_ascii=False), encoding="utf-8")
        result = run_worker(WORKER, ["chat", str(source_dir), "--messages", str(request)], Path(scratch) / "log",
                            Path(scratch) / "chat.result.json", served=True)
    text = result.get("text") if result.get("ok") else None
    return text if isinstance(text, str) and text.strip() else None


def render_chats(source_dir: Path, conversations: list[list[dict[str, str]]], scratch: Path,
                 log_path: Path) -> tuple[list[str] | None, str]:
    """Each conversation through the source's chat template, without a leading BOS (calibration windows start
    with their own), and how they were rendered; None when the tokenizer has no template or it refuses a plain
    user/assistant conversation (the caller then uses the turns as plain text)."""
    result = _ask("chats", source_dir, "--conversations", conversations, scratch, log_path)
    return result["texts"], result["how"]


def _ask(command: str, source_dir: Path, flag: str, request: object, scratch: Path, log_path: Path) -> dict:
    """One request to the served worker, its JSON payload in a file; SourceError naming what it refused."""
    path = scratch / f"{command}.request.json"
    path.write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
    try:
        result = run_worker(WORKER, [command, str(source_dir), flag, str(path)], log_path,
                            scratch / f"{command}.result.json", served=True)
    finally:
        path.unlink(missing_ok=True)
    if not result.get("ok"):
        raise SourceError(_message(result.get("error", "the tokenizer worker failed")))
    return result


def _message(error: str) -> str:
    """The worker's "SourceError: text" as the text alone (the parent raises the type itself)."""
    kind, sep, text = error.partition(": ")
    return text if sep and kind == "SourceError" else error


# ------------------------------------------------------------------------------------------- child side

def load_tokenizer(source_dir: Path) -> Any:
    """The source's tokenizer; a broken file is named (transformers' own error often is a bare codec message)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source_dir)
    except Exception as exc:  # transformers raises many types for one cause: a file it cannot read
        for name in TOKENIZER_FILES:
            path = source_dir / name
            if path.suffix == ".json" and path.is_file():
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, ValueError) as bad:
                    raise SourceError(f"{path}: not a valid tokenizer file ({bad})") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{source_dir}: cannot load the tokenizer ({first[:300]})") from None


def bos_added(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer itself prepends it (add_special_tokens=True), else None. Qwen-family
    tokenizers define a BOS token but do not add one; llama.cpp follows the same rule."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def _tokenize(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_tokenizer(args.source)
    texts = json.loads(args.texts.read_text(encoding="utf-8"))["texts"]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    bos = bos_added(tokenizer)
    return {"ok": True, "ids": ids, "bos_id": tokenizer.bos_token_id, "adds_bos": bos is not None}


def _chat(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_tokenizer(args.source)
    messages = json.loads(args.messages.read_text(encoding="utf-8"))
    return {"ok": True, "text": tokenizer.apply_chat_template(messages, tokenize=False)}


def _chats(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = load_tokenizer(args.source)
    if not tokenizer.chat_template:
        return {"ok": True, "texts": None, "how": "plain turns (the model has no chat template)"}
    conversations = json.loads(args.conversations.read_text(encoding="utf-8"))
    bos = tokenizer.bos_token or ""
    texts = []
    for messages in conversations:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja raises TemplateError, and a template may raise anything it likes
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return {"ok": True, "texts": None, "how": f"plain turns (the chat template refused them: {first})"}
        texts.append(text[len(bos):] if bos and text.startswith(bos) else text)
    return {"ok": True, "texts": texts, "how": "the model's chat template"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenizer_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenize")
    t.add_argument("source", type=Path)
    t.add_argument("--texts", type=Path, required=True)
    c = sub.add_parser("chat")
    c.add_argument("source", type=Path)
    c.add_argument("--messages", type=Path, required=True)
    m = sub.add_parser("chats")
    m.add_argument("source", type=Path)
    m.add_argument("--conversations", type=Path, required=True)
    return serve(parser, {"tokenize": _tokenize, "chat": _chat, "chats": _chats}, argv)


if __name__ == "__main__":
    sys.exit(main())
