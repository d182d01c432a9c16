"""Where a model's repos go: the Hub, or a folder laid out like it (`publish.to: dir:PATH`). The text of
`publish.to` is parsed here once; publishers, the disk plan and the published records read the parsed value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DIR_PREFIX = "dir:"
HUB = "hub"


@dataclass(frozen=True)
class Destination:
    folder: Path | None = None  # None: the Hub

    @classmethod
    def parse(cls, text: str) -> Destination:
        """`hub` or `dir:PATH` (the schema has refused anything else)."""
        if text.startswith(DIR_PREFIX):
            return cls(Path(text[len(DIR_PREFIX):]))
        if text != HUB:
            raise ValueError(f"unknown destination {text!r}: expected hub or dir:PATH")
        return cls()

    @property
    def hub(self) -> bool:
        return self.folder is None

    def location(self, repo_id: str) -> str:
        """Where `repo_id` is, in words: the repo id on the Hub, its folder otherwise."""
        return repo_id if self.folder is None else f"{self.folder}/{repo_id}"

    def __str__(self) -> str:
        return HUB if self.folder is None else f"{DIR_PREFIX}{self.folder}"
