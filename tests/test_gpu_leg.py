"""GPU legs use the GPU: the workflow's GPU leg checks the GPU and nvcc in seconds, installs CUDA torch and a
llama-cpp-python built with GGML_CUDA from a pip cache no CPU leg shares, and runs `quantforge doctor
--require-gpu` before it builds; and doctor --require-gpu fails on a machine whose torch or llama.cpp cannot use
a GPU (this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantforge import doctor

REPO = Path(__file__).resolve().parents[1]
FLOW = yaml.safe_load((REPO / "quantforge" / "templates" / "nightly.yml").read_text())
BUILD = FLOW["jobs"]["build"]
# a python that records what it is asked, and makes a virtual environment of recorders
RECORDER = """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
printf '%s\\n' "$(printf '%s ' "$@")| CMAKE_ARGS=$CMAKE_ARGS | PIP_CACHE_DIR=$PIP_CACHE_DIR" >> "$CALLS"
"""


def step(name: str) -> dict:
    return next(s for s in BUILD["steps"] if s.get("name", "").startswith(name))


def run_step(script: str, tmp_path: Path, path: list[Path], **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.pathsep.join([*map(str, path), "/usr/bin", "/bin"]), "HOME": str(tmp_path / "home"),
            "RUNNER_TEMP": str(tmp_path / "temp"), "GITHUB_PATH": str(tmp_path / "github_path"),
            "GITHUB_ENV": str(tmp_path / "github_env"), "GITHUB_OUTPUT": str(tmp_path / "github_output"),
            "CALLS": str(tmp_path / "calls"), "CMAKE_ARGS": FLOW["env"]["CMAKE_ARGS"],
            "QUANTFORGE_INSTALL": "-e .", "QUANTFORGE_CONSTRAINTS": "pins.txt"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                          env={**base, **env}, capture_output=True, text=True, cwd=tmp_path)


def installs(tmp_path: Path, *, gpu: bool) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(RECORDER)
    (bin_dir / "python").chmod(0o755)
    for used in ("calls", "github_path"):
        (tmp_path / used).unlink(missing_ok=True)
    flavor = "cuda" if gpu else "cpu"
    proc = run_step(step("Install quantforge")["run"], tmp_path, [bin_dir], GPU=str(gpu).lower(), FLAVOR=flavor)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "github_path").read_text().strip() == str(tmp_path / "temp" / "quantforge-venv" / "bin")
    return (tmp_path / "calls").read_text().splitlines()


def test_a_gpu_leg_installs_cuda_torch_and_builds_cuda_llama_cpp_from_its_own_pip_cache(tmp_path):
    gpu = installs(tmp_path, gpu=True)
    assert all(" install " in call and "-c pins.txt" in call for call in gpu)
    assert all(call.endswith(f"PIP_CACHE_DIR={tmp_path}/home/.cache/pip-cuda") for call in gpu)
    torch, llama, ninja, quantforge = (call.split(" | ")[0].split("-c pins.txt ")[1].strip() for call in gpu)
    assert (torch, llama, ninja, quantforge) == ("torch", "llama-cpp-python", "ninja", "-e .")  # PyPI's CUDA torch
    assert "CMAKE_ARGS=-DLLAVA_BUILD=OFF -DGGML_CUDA=on |" in gpu[1]
    assert "GGML_CUDA" not in gpu[0] + gpu[3]
    cpu = installs(tmp_path, gpu=False)
    assert [c.split(" | ")[0].split("-c pins.txt ")[1].strip() for c in cpu] == \
        ["torch --index-url https://download.pytorch.org/whl/cpu", "-e ."]
    assert all(c.endswith("/home/.cache/pip-cpu") and "GGML_CUDA" not in c for c in cpu)
    # the caches the two kinds restore are different too: flavour and the GPU's compute capability in the key
    assert BUILD["env"]["FLAVOR"] == "${{ matrix.gpu && 'cuda' || 'cpu' }}"
    pip_cache = next(s for s in BUILD["steps"] if "pip" in s.get("with", {}).get("path", ""))
    assert pip_cache["with"]["path"] == "~/.cache/pip-${{ env.FLAVOR }}"
    assert "${{ env.FLAVOR }}${{ steps.gpu.outputs.arch }}-${{ hashFiles(env.QUANTFORGE_CONSTRAINTS) }}" in \
        pip_cache["with"]["key"]


def test_a_gpu_leg_checks_the_gpu_first_and_doctor_before_it_builds():
    names = [s.get("name") or s["uses"] for s in BUILD["steps"]]
    check, doctor_step, build = (names.index(step(n).get("name")) for n in
                                 ("Check the GPU", "Check that torch", "Build"))
    assert check <= 1 and names.index("Install quantforge") < doctor_step < build  # seconds in; then installed
    assert step("Check the GPU")["if"] == step("Check that torch")["if"] == "matrix.gpu"
    assert step("Check that torch")["run"] == "quantforge doctor --require-gpu"
    assert BUILD["timeout-minutes"] == "${{ matrix.timeout }}" and step("Free disk")["if"] == "matrix.hosted"


def fake(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + script)
    (bin_dir / name).chmod(0o755)


def test_the_gpu_check_fails_in_seconds_without_a_gpu_or_nvcc(tmp_path):
    # the toolkit's default place, moved here: this machine may have one
    script = step("Check the GPU")["run"].replace("/usr/local/cuda", str(tmp_path / "usr-local-cuda"))
    none = run_step(script, tmp_path, [], CUDA_HOME="")
    assert none.returncode != 0 and "::error::this leg's runner is a GPU runner" in none.stdout
    bin_dir = tmp_path / "bin"
    fake(bin_dir, "nvidia-smi", 'if [ "$1" = -L ]; then echo "GPU 0: NVIDIA H100"; else echo "9.0"; fi\n')
    no_nvcc = run_step(script, tmp_path, [bin_dir], CUDA_HOME="")
    assert no_nvcc.returncode != 0 and "::error::no nvcc on this GPU runner" in no_nvcc.stdout
    cuda = tmp_path / "cuda"
    fake(cuda / "bin", "nvcc", 'echo "Cuda compilation tools, release 12.8"\n')
    ok = run_step(script, tmp_path, [bin_dir], CUDA_HOME=str(cuda))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (tmp_path / "github_output").read_text() == "arch=sm90\n"
    assert f"CUDACXX={cuda}/bin/nvcc\n" in (tmp_path / "github_env").read_text()


def test_doctor_require_gpu_fails_here_with_what_is_missing():
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "doctor", "--require-gpu", "--json"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    assert "sees no CUDA device" in info["gpu required"] and info["gpu required"] in info["problems"]
    assert "llama-cpp-python was built without GPU offload: rebuild it with CMAKE_ARGS=\"-DGGML_CUDA=on\"" in \
        info["gpu required"]  # this machine's llama.cpp is a CPU build
    assert proc.stderr.startswith("error: --require-gpu: torch ")
    plain = subprocess.run([sys.executable, "-m", "quantforge.cli", "doctor", "--json"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "gpu required" not in json.loads(plain.stdout)  # without the flag no GPU is asked for


def test_require_gpu_passes_when_torch_and_libllama_both_use_the_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert doctor.gpu_failures(True) == []
    assert doctor.gpu_failures(False) == [
        "llama-cpp-python was built without GPU offload: rebuild it with CMAKE_ARGS=\"-DGGML_CUDA=on\" from a pip "
        "cache that holds no CPU build of it (its own PIP_CACHE_DIR, or --no-cache-dir)"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "nvidia_driver_present", lambda: True)
    assert "is a CPU build: install PyPI's default (CUDA) torch wheel" in doctor.gpu_failures(True)[0]
