"""Children die with their build: every process quantforge starts (served workers, the converter, torch and
GPTQModel workers, pip) is killed by the kernel the moment the process that started it dies, from any signal,
SIGKILL included. A cancelled CI job or an out-of-memory kill of the build then leaves no worker holding memory
or writing into the work dir.

Linux's PR_SET_PDEATHSIG does it, set in the child between fork and exec (Popen's preexec_fn; it survives exec).
Two caveats from prctl(2): the signal fires when the *thread* that forked the child exits, not the process
(quantforge starts children from its main thread only; a worker started from a thread that then ends is killed,
and ServedWorker starts a new one for the next command); and a parent that died before the prctl call is not
noticed, so the child compares its parent pid with the one that forked it right after, and dies if it changed.

A child's own children are its business: none of the tools quantforge runs starts processes of its own
(measured over a build's every step, tests/test_lifeline.py). Elsewhere than Linux nothing is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# looked up once, in the parent: between fork and exec the child should do as little as possible
_PRCTL = _load_prctl()


def die_with(parent: int) -> None:
    """In a child: be killed (SIGKILL) when the process `parent` dies; die now if it already has."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above: nobody would send the signal
        os.kill(os.getpid(), signal.SIGKILL)


def child_options() -> dict[str, Any]:
    """Keyword arguments for subprocess.Popen/run that make the child die with this process."""
    if _PRCTL is None:
        return {}
    parent = os.getpid()
    return {"preexec_fn": lambda: die_with(parent)}
