"""Running a toolchain's work in a child process: its output goes to the step's log file, a crash or an
out-of-memory kill fails that one step, and the memory it used is returned when it exits.

The child writes its outcome as JSON to a result file, so success is never parsed from free text. Progress is:
the parent reads what the child appended to the log about once a second and reports the latest line that
matches a progress pattern (the child's own `quantforge-progress: ...` lines, or a tool's, such as
GPTQModel's "Quantizing layer 3 of 29").
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROGRESS_PREFIX = "quantforge-progress: "
_OWN_PROGRESS = re.compile(re.escape(PROGRESS_PREFIX) + r"(?P<text>[^\r\n]+)")


def report_progress(text: str) -> None:
    """Called in the child: one progress line for the parent (stdout is the step's log)."""
    print(PROGRESS_PREFIX + text, flush=True)


def check_commands(sub: Any, artifact: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Called in the child: the `generate` and `evaluate` commands every consumer's worker offers, with the
    arguments they share; the worker adds its own."""
    generate = sub.add_parser("generate")
    generate.add_argument(artifact, type=Path)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--tokens", type=int, default=8)
    evaluate = sub.add_parser("evaluate")
    evaluate.add_argument(artifact, type=Path)
    evaluate.add_argument("--windows", type=Path, required=True)
    evaluate.add_argument("--reference", type=Path, required=True)
    evaluate.add_argument("--sample", type=Path)
    return generate, evaluate


def serve(parser: argparse.ArgumentParser, commands: dict[str, Callable[[Any], dict[str, Any]]],
          argv: list[str] | None = None) -> int:
    """Called in the child: parse `--result FILE COMMAND ...`, run the command, and write its result (or the
    exception, as data) to FILE."""
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = commands[args.command](args)
    except Exception as exc:  # reported to the parent as data; the traceback goes to the log
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    args.result.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if result.get("ok") else 1


# What to change when a worker is killed for memory; a caller that knows its tool says it more precisely.
OOM_HINT = ("give it more memory, or ask less of it: fewer threads (--threads N), fewer evaluation windows or "
            "calibration samples (evaluation.chunks, calibration.samples), or a CUDA GPU")


def run_worker(module: str, args: Sequence[str], log_path: Path, result_file: Path, *,
               progress: Callable[[str], None] | None = None,
               patterns: Sequence[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = (),
               env: dict[str, str] | None = None, cwd: Path | None = None, label: str | None = None,
               oom_hint: str = OOM_HINT) -> dict[str, Any]:
    """Run `python -m module --result FILE *args` (in `cwd`: some tools write files where they run); return its
    result (ok false when it wrote none), with "peak_rss_bytes": the most resident memory its process tree held.
    A child killed by SIGKILL (the kernel's out-of-memory killer, or a cgroup limit) gets an error naming
    `label` (default: the step whose log this is), the peak it reached, the limit, and `oom_hint`."""
    from .memory import watch

    cmd = [sys.executable, "-m", module, "--result", str(result_file), *args]
    watched = [(_OWN_PROGRESS, lambda m: m["text"]), *patterns]
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)

        def tick() -> None:
            nonlocal start
            if progress is not None:
                start = _report_latest(log_path, start, watched, progress)

        try:
            outcome = watch(proc, tick)
        except BaseException:  # interrupted: do not leave the child running
            proc.kill()
            proc.wait()
            raise
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {"ok": False, "error": f"{module.rsplit('.', 1)[-1]} exited with code {proc.returncode} and no "
                                        "result"}
        if outcome.returncode in (-9, 137):
            result["error"] = _killed(label or _label_of(log_path), outcome.peak_rss, oom_hint)
            result["killed"] = True
    finally:
        result_file.unlink(missing_ok=True)
    result["peak_rss_bytes"] = outcome.peak_rss
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# quantforge: exit code {outcome.returncode}, peak RSS {outcome.peak_rss} bytes\n")
    return result


def _label_of(log_path: Path) -> str:
    """The step a log belongs to, from the header the engine writes ("# LABEL (key ...)"), else the file name."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        first = ""
    match = re.match(r"# (.+?) \(key [0-9a-f]+\)", first)
    return match[1] if match else log_path.stem


def _killed(label: str, peak: int, hint: str) -> str:
    from ..figures import format_size
    from .memory import host_memory

    memory = host_memory()
    limit = (f"under a {format_size(memory.cgroup.limit)} cgroup limit" if memory.cgroup is not None
             else f"on a machine with {format_size(memory.total)}")
    return (f"{label} was killed (SIGKILL: out of memory) after its processes reached {format_size(peak)} "
            f"resident, {limit}; {hint}")


def _report_latest(log_path: Path, start: int, watched: Sequence[tuple[re.Pattern[str], Callable]],
                   progress: Callable[[str], None]) -> int:
    with open(log_path, "rb") as f:
        f.seek(start)
        data = f.read()
    cut = data.rfind(b"\n") + 1  # keep a partial last line for the next look
    if not cut:
        return start
    text = data[:cut].decode("utf-8", errors="replace")
    latest: tuple[int, str] | None = None
    for pattern, describe in watched:
        for match in pattern.finditer(text):
            if latest is None or match.start() >= latest[0]:
                latest = (match.start(), describe(match))
    if latest is not None:
        progress(latest[1])
    return start + cut
