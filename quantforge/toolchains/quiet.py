"""Keep third-party output off the user's console when library code has to run in the build process itself.

torch, transformers and torchao (which GPTQModel pulls in) print on import and on first use: torchao's "Failed to
load …_C_mxfp8….so" and "Detected no triton", torch's `_pytree` deprecation lines. They come through Python
logging, the warnings module and C code alike, so the redirect is at the file-descriptor level.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def output_to(log_path: Path | None) -> Iterator[None]:
    """Send everything this process writes to stdout and stderr into `log_path` while the block runs."""
    if log_path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")  # shown (into the log), once per place
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
