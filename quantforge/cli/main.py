"""The entry point: the app with every command registered, and how a signal ends it."""

from __future__ import annotations

import logging
import sys

from . import build_commands, tool_commands  # noqa: F401 (registering their commands on the app)
from .common import app


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a cancelled CI job: end as an interrupted build does (workers closed, --json said)


def main() -> None:
    import signal

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminated)
    app()

