"""Children die with their build (toolchains/lifeline.py): whatever kills the build, SIGKILL included, no worker,
converter or tool it started is left running."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).parent
GONE_WITHIN = 2.0  # seconds after the build's death


def _alive(pids: list[int]) -> list[str]:
    """The processes among `pids` still running (a zombie has ended: only its exit status is left to collect)."""
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_and_wait(parent: subprocess.Popen, descendants: list[int]) -> list[str]:
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + GONE_WITHIN
    while (left := _alive(descendants)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# A parent that starts a child the way quantforge does and then waits (SIGKILLed by the test)
PARENT = """
import subprocess, sys, time
from pathlib import Path
from quantforge.toolchains.lifeline import child_options
from quantforge.toolchains.worker import run_worker
how = sys.argv[1]
if how == "popen":
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], **child_options())
    print("started", flush=True)
    time.sleep(120)
else:  # a served worker, busy with a command when its parent dies
    print("started", flush=True)
    run_worker("served_child", ["nap", "120"], Path(sys.argv[2]) / "log", Path(sys.argv[2]) / "r.json", served=True)
"""


@pytest.mark.parametrize("how", ["popen", "served"])
def test_a_child_dies_within_a_second_of_its_parent(tmp_path, how):
    env = {**__import__("os").environ, "PYTHONPATH": f"{TESTS.parent}:{TESTS}"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert parent.stdout is not None and parent.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 30
    while not (children := psutil.Process(parent.pid).children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children, "the parent started no child"
    left = _kill_and_wait(parent, [c.pid for c in children])
    assert left == [], left


def test_a_child_whose_parent_died_before_it_was_told_dies_at_once():
    """The race prctl(2) leaves open: the parent is gone before the child asks to be signalled."""
    code = ("import os, sys; from quantforge.toolchains.lifeline import die_with; die_with(int(sys.argv[1])); "
            "print('still here')")
    proc = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True)  # pid 1 is not its parent
    assert proc.returncode == -signal.SIGKILL and "still here" not in proc.stdout


TARGETS = """
defaults:
  publish: {{to: "dir:./out", namespace: t}}
  evaluation: {{ctx: 64, chunks: 2, max_ppl_increase: {{gguf: 10, gptq: 10}}}}
  calibration: {{samples: 4, seq_len: 32}}
models:
  - name: t
    source: {source}
    formats: {{gguf: {{types: [Q5_0], imatrix: true}}, gptq: {{bits: 4, group_size: 32}}}}
"""

# Each heavy step, told by the command line of the child doing it, in the order a build reaches them
HEAVY = [
    ("tokenizer worker", ["tokenizer_worker"]),
    ("torch reference", ["torch_worker", " ref"]),
    ("converter", ["convert_hf_to_gguf.py"]),
    ("torch importance matrix", ["torch_worker", " imatrix"]),
    ("libllama quantize worker", ["llamacpp_worker", "--serve"]),
    ("libllama verify", ["llamacpp_worker", " generate"]),
    ("GPTQModel", ["gptqmodel_worker"]),
]


@pytest.mark.slow
def test_a_build_killed_in_each_heavy_step_leaves_no_child_running(tmp_path, tiny_models):
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS.format(source=tiny_models("llama")))
    command = [sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir", str(tmp_path / "work"),
               "--keep-going"]
    for what, marks in HEAVY:  # one build per step: each resumes where the last was killed
        build = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tree = psutil.Process(build.pid)
        deadline = time.monotonic() + 600
        found = None
        while found is None and build.poll() is None and time.monotonic() < deadline:
            for child in tree.children(recursive=True):
                try:
                    if all(mark in " ".join(child.cmdline()) for mark in marks):
                        found = child
                except psutil.Error:
                    pass
            time.sleep(0.02)
        assert found is not None, f"the build never ran the {what} (exit code {build.poll()})"
        time.sleep(0.3)  # into the step's work, past the child's start
        descendants = [p.pid for p in tree.children(recursive=True)]
        left = _kill_and_wait(build, descendants)
        assert left == [], f"killed during the {what}: {left}"
