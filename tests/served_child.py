"""A worker for tests of served workers (toolchains/worker.py): commands that print (from Python and straight to
the file descriptors, as a C library does), hold memory, sleep, or die."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from quantforge.toolchains.worker import serve


def hold(args: argparse.Namespace) -> dict[str, Any]:
    print(f"python says {args.text}")
    os.write(2, f"C says {args.text}\n".encode())
    block = bytearray(args.mb << 20)  # zero pages are not resident until written
    for i in range(0, len(block), 4096):
        block[i] = 1
    return {"ok": True, "pid": os.getpid()}


def nap(args: argparse.Namespace) -> dict[str, Any]:
    import time

    time.sleep(args.seconds)
    return {"ok": True}


def die(args: argparse.Namespace) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    return {"ok": True}


def main() -> int:
    parser = argparse.ArgumentParser(prog="served_child")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hold")
    h.add_argument("text")
    h.add_argument("--mb", type=int, default=0)
    sub.add_parser("die")
    sub.add_parser("nap").add_argument("seconds", type=float)
    return serve(parser, {"hold": hold, "die": die, "nap": nap})


if __name__ == "__main__":
    sys.exit(main())
