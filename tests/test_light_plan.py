"""The nightly's plan job needs the tools' versions, not the tools: it installs quantforge with --no-deps and the
workflow's LIGHT_PACKAGES, and reads the versions of llama-cpp-python and GPTQModel from the constraints file the
legs install with. Here a child Python sees only that (symlinks to this environment's distributions that
LIGHT_PACKAGES needs, no site-packages; torch, transformers, llama_cpp and gptqmodel also blocked in its
sys.modules) and must plan the same keys as the full install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from tiny_models import fake_checkpoint

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = yaml.safe_load((REPO / "quantforge" / "templates" / "nightly.yml").read_text())
LIGHT = TEMPLATE["env"]["LIGHT_PACKAGES"].split()
HEAVY = ("torch", "transformers", "llama_cpp", "gptqmodel", "compressed_tensors", "mlx", "mlx_lm")
CHILD = ("import sys\n"
         f"for name in {HEAVY!r}:\n"
         "    sys.modules[name] = None  # import fails, as where it is not installed\n"
         "from quantforge.cli import main\n"
         "sys.argv = ['quantforge', *sys.argv[1:]]\n"
         "main()\n")
TARGETS = """
defaults:
  publish: {to: "dir:./out", namespace: t}
  formats: {gguf: {types: [Q8_0, Q4_K_M], imatrix: true}, gptq: {bits: 4, group_size: 64}, fp8: {}, mlx: {}}
models:
  - {name: m, source: ./ckpt}
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def light_site(dest: Path, requirements: list[str]) -> set[str]:
    """A folder with what `pip install REQUIREMENTS` puts in site-packages: each distribution they need
    (dependencies included, extras not) linked from this environment. Returns the distributions' names."""
    dists: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if canonical(req.name) in dists:
            continue
        dist = dists[canonical(req.name)] = metadata.distribution(req.name)
        todo += [r for r in map(Requirement, dist.requires or ()) if not r.marker or r.marker.evaluate({"extra": ""})]
    dest.mkdir(parents=True)
    for dist in dists.values():
        base = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:
            if (base / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(base / top)
    return set(dists)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("light") / "site-packages"
    names = light_site(dest, LIGHT)
    assert not {"torch", "transformers", "llama-cpp-python", "gptqmodel", "accelerate", "optimum",
                "compressed-tensors", "mlx-lm", "mlx"} & names
    return dest


@pytest.fixture
def project(tmp_path) -> Path:
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    # MLX's plan asks the installed mlx-lm about the architecture, where there is one (not in the light install)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    (tmp_path / "targets.yaml").write_text(TARGETS)
    pins = "".join(f"{tool}=={metadata.version(tool)}\n" for tool in ("llama-cpp-python", "gptqmodel",
                                                                      "compressed-tensors", "mlx-lm", "mlx"))
    (tmp_path / "pins.txt").write_text(f"# the legs' pins\n{pins}")
    return tmp_path


def light(site: Path, cwd: Path, *args: str, constraints: str | None = "pins.txt") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUANTFORGE_CONSTRAINTS")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{site}"
    if constraints:
        env["QUANTFORGE_CONSTRAINTS"] = constraints
    # -S: no site-packages, so neither the tools nor their metadata (the versions) are there
    return subprocess.run([sys.executable, "-S", "-c", CHILD, *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def full(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("QUANTFORGE_CONSTRAINTS", None)
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_the_light_packages_are_the_projects_own_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonical(Requirement(d).name): str(Requirement(d).specifier) for d in project["dependencies"]}
    for requirement in map(Requirement, LIGHT):  # the same ranges: --no-deps drops pyproject's
        assert declared[canonical(requirement.name)] == str(requirement.specifier), requirement


def test_a_plan_without_the_toolchain_has_the_keys_of_the_full_install(site, project):
    light_keys = light(site, project, "plan", "targets.yaml", "--json")
    assert light_keys.returncode == 0, light_keys.stderr
    full_keys = full(project, "plan", "targets.yaml", "--json")
    assert full_keys.returncode == 0, full_keys.stderr

    def keys(proc: subprocess.CompletedProcess) -> dict[str, str]:
        return {s["label"]: s["key"] for s in json.loads(proc.stdout)["steps"]}

    assert keys(light_keys) == keys(full_keys) and len(keys(full_keys)) > 15
    matrix = light(site, project, "plan", "targets.yaml", "--github-matrix")
    assert matrix.returncode == 0, matrix.stderr
    assert json.loads(matrix.stdout) == json.loads(full(project, "plan", "targets.yaml", "--github-matrix").stdout)
    # and nothing heavy was imported behind the blocks' back: the child could not have
    proc = subprocess.run([sys.executable, "-S", "-c", "import torch"], env={"PYTHONPATH": str(site)},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def test_a_plan_without_the_toolchain_or_its_pins_says_what_to_pin(site, project):
    proc = light(site, project, "plan", "targets.yaml", "--github-matrix", constraints=None)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: llama-cpp-python is not installed; run the README's set-up command, or name a pip constraints " \
           "file pinning it (llama-cpp-python==VERSION) in QUANTFORGE_CONSTRAINTS" in proc.stderr
    (project / "pins.txt").write_text("llama-cpp-python==0.3.36\n")  # GPTQ's keys need GPTQModel's version too
    proc = light(site, project, "plan", "targets.yaml", "--github-matrix")
    assert proc.returncode == 1 and "gptqmodel is not installed and pins.txt (QUANTFORGE_CONSTRAINTS) pins no " \
                                    "version of it" in proc.stderr


def test_an_installed_tool_counts_and_a_pin_that_disagrees_is_logged(tmp_path, monkeypatch, caplog):
    from quantforge.toolchains.pins import tool_version

    installed = metadata.version("llama-cpp-python")
    monkeypatch.setenv("QUANTFORGE_CONSTRAINTS", str(tmp_path / "missing.txt"))
    assert tool_version("llama-cpp-python") == installed  # the file is only needed where the tool is not
    (tmp_path / "pins.txt").write_text("llama_cpp_python == 0.0.1  # another\n")
    monkeypatch.setenv("QUANTFORGE_CONSTRAINTS", str(tmp_path / "pins.txt"))
    assert tool_version("llama-cpp-python") == installed
    assert f"llama-cpp-python {installed} is installed but {tmp_path / 'pins.txt'} pins 0.0.1" in caplog.text
    (tmp_path / "pins.txt").write_text("some_tool==1.2.3\n")
    assert tool_version("Some.Tool") == "1.2.3"  # not installed: the pin, names compared as the index does
