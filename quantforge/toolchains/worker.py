"""Running a toolchain's work in a child process: its output goes to the step's log file, a crash or an
out-of-memory kill fails that one step, and the memory it used is returned when it exits.

The child writes its outcome as JSON to a result file, so success is never parsed from free text. Progress is:
the parent reads what the child appended to the log about once a second and reports the latest line that
matches a progress pattern (the child's own `quantforge-progress: ...` lines, or a tool's, such as
GPTQModel's "Quantizing layer 3 of 29").
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .lifeline import child_options

PROGRESS_PREFIX = "quantforge-progress: "
SERVE_FLAG = "--serve"
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
    exception, as data) to FILE. Started with `--serve` alone, run one such command line per request instead
    (see ServedWorker)."""
    parser.add_argument("--result", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    if argv == [SERVE_FLAG]:
        return _serve_requests(parser, commands)
    return _run_once(parser, commands, argv)


def _run_once(parser: argparse.ArgumentParser, commands: dict[str, Callable[[Any], dict[str, Any]]],
              argv: list[str]) -> int:
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


def _serve_requests(parser: argparse.ArgumentParser, commands: dict[str, Callable[[Any], dict[str, Any]]]) -> int:
    """One request per line on stdin, {"argv": [...], "log": PATH}: run it with stdout and stderr (the tool's
    own C-level output too) pointed at that log, and reply with its exit code, one line on the stdout this
    process was started with. Between requests output goes nowhere. Ends when stdin closes."""
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")
    idle = os.open(os.devnull, os.O_WRONLY)
    os.dup2(idle, 1)
    os.dup2(idle, 2)
    for line in sys.stdin:
        request = json.loads(line)
        with open(request["log"], "ab", buffering=0) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                code = _run_once(parser, commands, request["argv"])
            except SystemExit as exc:  # argparse refused the arguments (its message is in the log)
                code = exc.code if isinstance(exc.code, int) else 2
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(idle, 1)
                os.dup2(idle, 2)
        reply.write(f"{code}\n")
        reply.flush()
    return 0


# What to change when a worker is killed for memory; a caller that knows its tool says it more precisely.
OOM_HINT = ("give it more memory, or ask less of it: fewer threads (--threads N), fewer evaluation windows or "
            "calibration samples (evaluation.chunks, calibration.samples), or a CUDA GPU")


def run_worker(module: str, args: Sequence[str], log_path: Path, result_file: Path, *,
               progress: Callable[[str], None] | None = None,
               patterns: Sequence[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = (),
               env: dict[str, str] | None = None, cwd: Path | None = None, label: str | None = None,
               oom_hint: str = OOM_HINT, served: bool = False) -> dict[str, Any]:
    """Run `python -m module --result FILE *args` (in `cwd`: some tools write files where they run); return its
    result (ok false when it wrote none), with "peak_rss_bytes": the most resident memory its process tree held.
    A child killed by SIGKILL (the kernel's out-of-memory killer, or a cgroup limit) gets an error naming
    `label` (default: the step whose log this is), the peak it reached, the limit, and `oom_hint`.
    `served`: hand the command to a long-lived worker of `module` (started on first use, ServedWorker) rather
    than a new process: for short calls of a tool that frees what it allocates, whose start-up (imports) is a
    large share of the work (libllama's quantization of a small model, the tokenizer)."""
    from .memory import watch

    argv = ["--result", str(result_file), *args]
    cmd = [sys.executable, "-m", module, *argv]
    worker = ServedWorker.of(module) if served and env is None and cwd is None else None
    watched = [(_OWN_PROGRESS, lambda m: m["text"]), *patterns]
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}" + (f"  # served by worker pid {worker.pid}" if worker else "") + "\n")
        log.flush()
        start = log.tell()

        def tick() -> None:
            nonlocal start
            if progress is not None:
                start = _report_latest(log_path, start, watched, progress)

        if worker is not None:
            outcome = worker.run(argv, log_path, tick)
        else:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    **child_options())
            try:
                outcome = watch(proc, tick)
            except BaseException:  # interrupted: do not leave the child running
                proc.kill()
                proc.wait()
                raise
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {"ok": False, "error": f"{module.rsplit('.', 1)[-1]} exited with code {outcome.returncode} and "
                                        "no result"}
        if outcome.returncode in (-9, 137):
            result["error"] = _killed(label or _label_of(log_path), outcome.peak_rss, oom_hint)
            result["killed"] = True
    finally:
        result_file.unlink(missing_ok=True)
    result["peak_rss_bytes"] = outcome.peak_rss
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# quantforge: exit code {outcome.returncode}, peak RSS {outcome.peak_rss} bytes\n")
    return result


class ServedWorker:
    """A long-lived `python -m module --serve` child that runs one command at a time (worker.serve). Each
    command's output goes to its own step log, its peak RSS is counted from the start of that command (the
    kernel's high-water mark is reset through /proc/PID/clear_refs), and a kill (out of memory) fails that
    command alone: the next one gets a fresh worker. The worker exits when this process closes its stdin, at
    exit or through close_served_workers(), or dies with it."""

    _workers: ClassVar[dict[str, ServedWorker]] = {}
    _lock = threading.Lock()

    def __init__(self, module: str):
        self.module = module
        self.busy = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", module, SERVE_FLAG], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     **child_options())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def of(cls, module: str) -> ServedWorker | None:
        """The running worker of `module` (a new one if there is none, or it died); None when it is busy with
        another thread's command (the caller then starts a process of its own)."""
        with cls._lock:
            worker = cls._workers.get(module)
            if worker is None or worker.proc.poll() is not None:
                worker = cls._workers[module] = cls(module)
            return worker if not worker.busy.locked() else None

    def run(self, argv: list[str], log_path: Path, tick: Callable[[], None]) -> Any:
        from .memory import reset_peak_rss, watch

        with self.busy:
            reset_peak_rss(self.proc.pid)
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
                self.proc.stdin.flush()
                outcome = watch(self.proc, tick, reply=self.proc.stdout)
            except BaseException:  # interrupted, or the worker is gone: the next command gets a new one
                self.close(kill=True)
                raise
            if outcome.returncode not in (0, 1):  # killed, or it refused its arguments: do not reuse it
                self.close(kill=True)
            return outcome

    def close(self, kill: bool = False, wait: bool = True) -> None:
        """End the worker: at once (`kill`), or by closing its stdin, after which it exits by itself; `wait`: until
        it has (a worker that imported torch spends most of a second tearing down, which nothing needs to wait for
        at the end of a build)."""
        if kill:
            self.proc.kill()
        elif self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if kill or wait:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with ServedWorker._lock:
            if ServedWorker._workers.get(self.module) is self:
                del ServedWorker._workers[self.module]


def close_served_workers(wait: bool = False) -> None:
    """End every idle served worker (a build does at its end; nothing is kept running between builds). Without
    `wait` they finish exiting on their own."""
    for worker in list(ServedWorker._workers.values()):
        worker.close(wait=wait)


atexit.register(close_served_workers)


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
