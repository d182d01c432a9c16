"""Where a checkpoint keeps its chat template: one rule for the source check, the card and the artifacts.

transformers 5 writes `chat_template.jinja`; older checkpoints carry `chat_template.json` ({"chat_template": ...})
or the template inside `tokenizer_config.json`. The first found wins, in that order.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip()
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = json.loads((path / name).read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, str) and template:
            return template
    return None


def has_chat_template(path: Path) -> bool:
    return read_chat_template(path) is not None
