"""`quantforge ci init`: every install line of the workflow it writes installs this project and nothing that could
be another's (`quantforge` on the package index is an option-pricing library; ours is quantforge-build, not yet
published), on every path ci init takes; and the constraints file it writes pins the tools whose versions enter
the keys."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from tiny_models import fake_checkpoint
from typer.testing import CliRunner

from quantforge import cli, distribution
from quantforge.distribution import DISTRIBUTION, PUBLISHED, canonical_name, from_checkout, from_distribution, is_ours
from quantforge.errors import BadInputError
from quantforge.nightly import workflow_text
from quantforge.pipeline import KEY_TOOLS
from quantforge.toolchains.pins import RUNTIME, installed_pins

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# what a job may install besides quantforge: its own dependencies and the GPU leg's ninja
THIRD_PARTY = {canonical_name(re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]) for dep in PROJECT["dependencies"]} | \
    {"ninja"}


def test_the_distribution_name_is_ours_and_free_on_the_index():
    assert PROJECT["name"] == DISTRIBUTION == "quantforge-build" and not PUBLISHED
    assert PROJECT["scripts"] == {"quantforge": "quantforge.cli:main"}  # the command keeps its name
    listing = Path("/work/.library/env/packages/pypi.tsv")  # the index's names, where this machine has the list
    if listing.is_file():
        names = {canonical_name(line.split("\t", 1)[0]) for line in listing.open(encoding="utf-8")}
        assert "quantforge" in names and DISTRIBUTION not in names


def pip_installs(text: str, env: dict[str, str]) -> dict[str, list[str]]:
    """job -> every requirement its `pip install` lines name, with the workflow's env expanded."""
    out: dict[str, list[str]] = {}
    for job, spec in yaml.safe_load(text)["jobs"].items():
        found = out.setdefault(job, [])
        for step in spec["steps"]:
            for line in step.get("run", "").splitlines():
                line = line.split(" # ", 1)[0].split("  #", 1)[0].replace('"${pip[@]}"', "python -m pip install")
                if "pip install " not in line or line.strip().startswith("pip=("):
                    continue
                words = shlex.split(line.split("pip install ", 1)[1])
                i = 0
                while i < len(words):
                    word = words[i]
                    if word in ("-c", "--index-url", "--constraint", "-r"):
                        i += 2
                        continue
                    if word.startswith("-") and word != "-e":
                        i += 1
                        continue
                    if word == "-e":
                        found.append("-e " + words[i + 1])
                        i += 2
                        continue
                    if word.startswith("$"):
                        value = env[word.strip("${}")]
                        found += [value] if word == "$QUANTFORGE_INSTALL" else value.split()
                    else:
                        found.append(word)
                    i += 1
    return out


def assert_installs_only_ours(text: str, repo: Path) -> str:
    env = yaml.safe_load(text)["env"]
    installs = pip_installs(text, env)
    assert set(installs) == {"plan", "build", "summary"}
    for job, requirements in installs.items():
        assert env["QUANTFORGE_INSTALL"] in requirements, job  # each job installs quantforge from the one line
        for requirement in requirements:
            if requirement == env["QUANTFORGE_INSTALL"]:
                assert is_ours(requirement, repo), requirement
                continue
            name = canonical_name(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
            assert name != "quantforge" and name in THIRD_PARTY, (job, requirement)
    return env["QUANTFORGE_INSTALL"]


def test_the_install_check_refuses_what_could_be_another_project(tmp_path):
    for spec in ("quantforge", "quantforge==0.1.1", "Quantforge", "quantforge[all]", f"{DISTRIBUTION}==0.1.0",
                 DISTRIBUTION, "git+https://example.com/o/quantforge.git", "git+ssh://git@example.com/o/q.git",
                 "git+file:///work/main@" + SHA, "numpy", "-e ./elsewhere", "https://example.com/x.whl", ""):
        assert not is_ours(spec, tmp_path), spec
    for spec in (f"git+https://example.com/o/quantforge.git@{SHA}", f"git+ssh://git@example.com/o/q.git@{SHA}",
                 "git+https://example.com/o/quantforge.git@v0.1.0", f"{DISTRIBUTION} @ git+https://e.com/q.git@{SHA}"):
        assert is_ours(spec, tmp_path), spec
    (tmp_path / "pyproject.toml").write_text(f'[project]\nname = "{DISTRIBUTION}"\n')
    assert is_ours("-e .", tmp_path) and is_ours(".", tmp_path)
    with pytest.raises(BadInputError, match="unrelated project"):
        distribution.check_ours("quantforge==0.1.1", tmp_path)
    with pytest.raises(BadInputError, match="not published on the package index yet"):
        distribution.check_ours(f"{DISTRIBUTION}==0.1.0", tmp_path)


def git_checkout(folder: Path, remote: str | None) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    folder.mkdir(parents=True)
    git("init", "-q")
    (folder / "pyproject.toml").write_text(f'[project]\nname = "{DISTRIBUTION}"\n')
    git("add", "pyproject.toml")
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x")
    if remote:
        git("remote", "add", "origin", remote)
    return git("rev-parse", "HEAD")


def fake_dist(root: Path, direct_url: dict | None) -> metadata.Distribution:
    info = root / "quantforge_build-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 0.1.0\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return metadata.PathDistribution(info)


def test_the_install_line_is_the_commit_of_the_quantforge_that_runs(tmp_path):
    head = git_checkout(tmp_path / "co", "git@github.com:someone/quantforge.git")
    spec = from_checkout(tmp_path / "co", "a checkout")
    assert spec.spec == f"git+ssh://git@github.com/someone/quantforge.git@{head}"
    assert any("on no branch of origin" in w for w in spec.warnings)  # never pushed (no remote branches here)
    installed = from_distribution(fake_dist(tmp_path / "a", {
        "url": "https://github.com/someone/quantforge.git",
        "vcs_info": {"vcs": "git", "commit_id": SHA, "requested_revision": "main"}}))
    assert installed.spec == f"git+https://github.com/someone/quantforge.git@{SHA}"
    editable = from_distribution(fake_dist(tmp_path / "b", {"url": (tmp_path / "co").as_uri(),
                                                            "dir_info": {"editable": True}}))
    assert editable.spec == spec.spec
    for direct, message in ((None, "installed from a package index, where it is not published"),
                            ({"url": (tmp_path / "w.whl").as_uri(), "archive_info": {}}, "cannot pin"),
                            ({"url": "file:///src/q", "vcs_info": {"vcs": "git", "commit_id": SHA}}, "local git")):
        with pytest.raises(BadInputError, match=message):
            from_distribution(fake_dist(tmp_path / str(len(message)), direct))
    git_checkout(tmp_path / "lonely", None)
    with pytest.raises(BadInputError, match="no git remote"):
        from_checkout(tmp_path / "lonely", "a checkout")
    git_checkout(tmp_path / "local-remote", str(tmp_path / "co"))
    with pytest.raises(BadInputError, match="local path, which a runner cannot reach"):
        from_checkout(tmp_path / "local-remote", "a checkout")


@pytest.fixture
def user_repo(tmp_path):
    repo = tmp_path / "repo"
    fake_checkpoint(repo / "ckpt")
    (repo / "conf").mkdir()
    (repo / "conf" / "models.yaml").write_text("models:\n  - {name: m, source: ../ckpt, formats: {gguf: {}}}\n")
    return repo


def ci_init(repo: Path, *extra: str):
    return CliRunner().invoke(cli.app, ["ci", "init", "--targets", str(repo / "conf" / "models.yaml"), "--out",
                                        str(repo), *extra])


def written(repo: Path) -> str:
    return (repo / ".github" / "workflows" / "nightly.yml").read_text()


def test_every_path_of_ci_init_writes_install_lines_of_this_project_only(user_repo, tmp_path, monkeypatch):
    installs = []
    # run from a checkout (editable, or PYTHONPATH): its remote at its HEAD
    head = git_checkout(tmp_path / "co", "https://example.com/someone/quantforge.git")
    monkeypatch.setattr(distribution, "running_source_tree", lambda: tmp_path / "co")
    result = ci_init(user_repo)
    assert result.exit_code == 0, result.output
    assert "on no branch of origin" in result.output  # the warning: push it first
    installs.append(assert_installs_only_ours(written(user_repo), user_repo))
    assert installs[-1] == f"git+https://example.com/someone/quantforge.git@{head}"
    # installed from git: PEP 610's record of the commit
    monkeypatch.setattr(distribution, "running_source_tree", lambda: None)
    dist = fake_dist(tmp_path / "site", {"url": "https://example.com/o/quantforge.git",
                                         "vcs_info": {"vcs": "git", "commit_id": SHA}})
    real = metadata.distribution
    monkeypatch.setattr(metadata, "distribution", lambda name: dist if name == DISTRIBUTION else real(name))
    assert ci_init(user_repo, "--force").exit_code == 0
    installs.append(assert_installs_only_ours(written(user_repo), user_repo))
    assert installs[-1] == f"git+https://example.com/o/quantforge.git@{SHA}"
    # given with --install
    assert ci_init(user_repo, "--force", "--install", "git+https://example.com/o/quantforge.git@v0.1.0").exit_code == 0
    installs.append(assert_installs_only_ours(written(user_repo), user_repo))
    # quantforge's own repository: -e .
    (user_repo / "pyproject.toml").write_text(f'[project]\nname = "{DISTRIBUTION}"\n')
    assert ci_init(user_repo, "--force").exit_code == 0
    installs.append(assert_installs_only_ours(written(user_repo), user_repo))
    assert installs[-1] == "-e ."
    # and where nothing says where this quantforge came from: an error asking for --install, no workflow
    (user_repo / "pyproject.toml").unlink()
    monkeypatch.setattr(metadata, "distribution",
                        lambda name: real(name + "-absent") if name == DISTRIBUTION else real(name))
    refused = ci_init(user_repo, "--force")
    assert refused.exit_code == 2 and "pass --install SPEC" in refused.output
    for bad in ("quantforge", f"quantforge=={distribution.installed_version()}", "git+https://e.com/q.git"):
        result = ci_init(user_repo, "--force", "--install", bad)
        assert result.exit_code == 2 and "error: --install" in result.output, (bad, result.output)
    assert len(set(installs)) == 4 and written(user_repo).count("QUANTFORGE_INSTALL: ") == 1


def test_the_shipped_workflows_install_only_this_project():
    for text, repo in ((workflow_text("targets.yaml", install="-e .", constraints="c.txt"), REPO),
                       ((REPO / ".github" / "workflows" / "nightly.yml").read_text(), REPO)):
        assert assert_installs_only_ours(text, repo) == "-e ."
    # the template itself names nothing: a job without ci init's line stops before pip runs
    template = yaml.safe_load((REPO / "quantforge" / "templates" / "nightly.yml").read_text())
    assert template["env"]["QUANTFORGE_INSTALL"] == ""
    install = next(s for s in template["jobs"]["plan"]["steps"] if s.get("name", "").startswith("Install"))
    assert install["run"].startswith(': "${QUANTFORGE_INSTALL:?')


def test_ci_init_pins_the_tools_the_keys_name_and_keeps_a_pinned_file(user_repo, monkeypatch):
    monkeypatch.setattr(distribution, "running_source_tree", lambda: None)
    install = ["--install", f"git+https://example.com/o/quantforge.git@{SHA}"]
    result = ci_init(user_repo, *install)
    assert result.exit_code == 0, result.output
    flow = yaml.safe_load(written(user_repo))
    assert flow["env"]["TARGETS"] == "conf/models.yaml"
    assert flow["env"]["QUANTFORGE_CONSTRAINTS"] == ".github/quantforge-constraints.txt"
    pins = {name: version for name, version in installed_pins(KEY_TOOLS + RUNTIME).items() if version}
    lines = [line for line in (user_repo / ".github" / "quantforge-constraints.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines == [f"{name}=={version}" for name, version in pins.items()]
    assert {"llama-cpp-python", "gptqmodel", "compressed-tensors", "mlx-lm", "mlx", "torch"} <= set(pins)
    assert "+" not in pins["torch"]  # 2.13.0, not +cpu
    # a constraints file of the user's own is kept when it pins the tools, refused when it does not
    own = user_repo / "pins.txt"
    ours = ("llama-cpp-python==0.3.36\ngptqmodel==7.6.0  # ours\ncompressed-tensors==0.20.1\nmlx-lm==0.32.2\n"
            "mlx==0.32.4\n")
    own.write_text(ours)
    kept = ci_init(user_repo, "--force", *install, "--constraints", str(own))
    assert kept.exit_code == 0 and f"kept {own}" in kept.output
    assert own.read_text() == ours
    assert yaml.safe_load(written(user_repo))["env"]["QUANTFORGE_CONSTRAINTS"] == "pins.txt"
    own.write_text("torch==2.13.0\n")
    refused = ci_init(user_repo, "--force", *install, "--constraints", str(own))
    assert refused.exit_code == 2
    assert "pins no version of llama-cpp-python, gptqmodel, compressed-tensors, mlx-lm, mlx" in refused.output
    assert own.read_text() == "torch==2.13.0\n"
    # the default file is ci init's own: --force writes it again with the versions installed here
    default = user_repo / ".github" / "quantforge-constraints.txt"
    default.write_text("llama-cpp-python==0.0.1\ngptqmodel==0.0.1\ncompressed-tensors==0.0.1\nmlx-lm==0.0.1\n"
                       "mlx==0.0.1\n")
    assert ci_init(user_repo, "--force", *install).exit_code == 0
    assert f"llama-cpp-python=={pins['llama-cpp-python']}\n" in default.read_text()
