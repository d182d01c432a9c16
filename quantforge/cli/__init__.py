"""The `quantforge` command. Thin: parse, call the library, print. Library errors become one line + exit code:
0 ok, 1 build or check failure, 2 bad input."""

from __future__ import annotations

from .common import app
from .main import main

__all__ = ["app", "main"]
