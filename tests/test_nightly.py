"""Nightlies end to end, as the shipped workflow runs them: its plan step, each leg's build step in a separate
checkout with its own work dir and Hugging Face cache, and its summary step, against a loopback Hub (the real
huggingface_hub client) that serves tiny models as sources and takes the published repos.

    first night     every model is built and published
    second night    nothing changed: the plan's matrix is empty, at one request per model and one per repo
    source moves    exactly that model's leg appears (a commit that changes a file builds read)
    a gate fails    that leg's repo is left as it was, the other publishes, the summary fails and says why
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = yaml.safe_load((REPO / "quantforge" / "templates" / "nightly.yml").read_text())
TOKEN = "hf_nightlyTokenNeverPrinted42"
TARGETS = """
defaults:
  publish: {to: hub, namespace: t}
  formats: {gguf: {types: [Q8_0]}}
  evaluation: {ctx: 64, chunks: 4, max_ppl_increase: {gguf: 0.5}, tokenizer_check: false}
models:
  - {name: a, source: org/src-a}
  - {name: b, source: org/src-b, runner: [self-hosted, gpu]}
"""
# a gate no measurement passes: Q8_0 of a tiny random model still moves the perplexity a little
STRICT_B = TARGETS.replace("runner: [self-hosted, gpu]}",
                           "runner: [self-hosted, gpu], evaluation: {max_ppl_increase: {gguf: 0.0}}}")


def step_script(job: str, *, name: str | None = None, step_id: str | None = None) -> str:
    return next(s["run"] for s in WORKFLOW["jobs"][job]["steps"]
                if (step_id and s.get("id") == step_id) or (name and s.get("name", "").startswith(name)))


class Nightly:
    """Runs the workflow's steps for one night: each job in its own folder (a fresh runner)."""

    def __init__(self, root: Path, hub: HubServer, targets: str):
        self.root, self.hub = root, hub
        self.targets = targets
        self.matrix: dict = {}
        self.extra_env: dict[str, str] = {}  # for every job of the night

    def env(self, job: Path, **extra: str) -> dict[str, str]:
        return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "HF_ENDPOINT": self.hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(job / ".hf"),
                "TARGETS": "targets.yaml", "ONLY": "", "FORCE": "", "GITHUB_OUTPUT": str(job / "outputs"),
                "GITHUB_STEP_SUMMARY": str(job / "summary.md"), **self.extra_env, **extra}

    def checkout(self, name: str) -> Path:
        job = self.root / name
        job.mkdir(parents=True)
        (job / "targets.yaml").write_text(self.targets)
        return job

    def run(self, script: str, job: Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=job,
                              env=self.env(job, **env), capture_output=True, text=True)

    def plan(self) -> list[str]:
        job = self.checkout("plan")
        proc = self.run(step_script("plan", step_id="plan"), job)
        (job / "stderr.log").write_text(proc.stderr)
        assert proc.returncode == 0, proc.stderr
        outputs = dict(line.split("=", 1) for line in (job / "outputs").read_text().splitlines())
        self.matrix = json.loads(outputs["matrix"])
        assert int(outputs["legs"]) == len(self.matrix["include"])
        return [leg["model"] for leg in self.matrix["include"]]

    def legs(self) -> dict[str, subprocess.CompletedProcess[str]]:
        """Each leg's build step in its own checkout; its report gathered as upload/download-artifact would."""
        script = step_script("build", name="Build")
        reports = self.root / "summary" / "reports"
        reports.mkdir(parents=True)
        done = {}
        for leg in self.matrix["include"]:
            job = self.checkout(f"leg-{leg['model']}")
            done[leg["model"]] = self.run(script, job, MODEL=leg["model"], REASONS="; ".join(leg["reasons"]),
                                          ESTIMATE=f"{leg['disk']} disk")
            shutil.copy(job / "reports" / f"{leg['model']}.json", reports)
        return done

    def summary(self) -> tuple[subprocess.CompletedProcess[str], str]:
        job = self.root / "summary"
        proc = self.run(step_script("summary", name="Summary"), job, MATRIX=json.dumps(self.matrix))
        return proc, (job / "summary.md").read_text() if (job / "summary.md").exists() else ""


@pytest.fixture(scope="module")
def hub(tiny_models, tmp_path_factory):
    source = tiny_models("llama")
    with HubServer() as server:
        server.seed("org/src-a", source)
        server.seed("org/src-b", source)
        yield server


def test_nightlies_build_what_changed_and_only_that(hub, tmp_path, tiny_models):
    # ---- first night: every model gets a leg, and each publishes its repo
    first = Nightly(tmp_path / "night-1", hub, TARGETS)
    assert first.plan() == ["a", "b"]
    assert first.matrix["include"][1]["runs-on"] == ["self-hosted", "gpu"]
    assert first.matrix["include"][0]["reasons"] == ["no build record at t/a-GGUF"]
    legs = first.legs()
    assert all(p.returncode == 0 for p in legs.values()), {m: p.stderr[-2000:] for m, p in legs.items()}
    proc, summary = first.summary()
    assert proc.returncode == 0, proc.stderr
    assert summary.startswith("### quantforge nightly: ok (2 legs)") and "t/a-GGUF (new commit)" in summary
    assert {r: len(hub.repos[r].commits) for r in ("t/a-GGUF", "t/b-GGUF")} == {"t/a-GGUF": 1, "t/b-GGUF": 1}
    record = json.loads(hub.repos["t/a-GGUF"].files["quantforge.json"]["content"])
    assert record["build"]["key"] == record["build"]["steps"]["a/gguf:publish"]

    # ---- second night: nothing changed; one request per model (its revision) and one per repo (its record)
    hub.requests.clear()
    second = Nightly(tmp_path / "night-2", hub, TARGETS)
    started = time.monotonic()
    assert second.plan() == []
    seconds = time.monotonic() - started
    requests = hub.api_requests()
    assert sorted(requests) == [("GET", "/api/models/org/src-a/revision/main"),
                                ("GET", "/api/models/org/src-b/revision/main"),
                                ("GET", "/t/a-GGUF/resolve/main/quantforge.json"),
                                ("GET", "/t/b-GGUF/resolve/main/quantforge.json")]
    print(f"\nsecond nightly's plan: {seconds:.2f} s, {len(requests)} requests, nothing downloaded")

    # ---- a source moves to a new commit: exactly that model's leg appears
    moved = tmp_path / "moved"
    shutil.copytree(tiny_models("llama"), moved)
    (moved / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a new commit\n")
    (moved / "generation_config.json").write_text('{"temperature": 0.7, "top_p": 0.9}\n')  # a file builds read
    hub.seed("org/src-a", moved, "a new commit")
    third = Nightly(tmp_path / "night-3", hub, TARGETS)
    assert third.plan() == ["a"]
    assert third.matrix["include"][0]["reasons"] == ["source: changed since published"]

    # ---- and b's gate is made stricter than it can pass: b fails, a publishes, the summary says why
    fourth = Nightly(tmp_path / "night-4", hub, STRICT_B)
    assert fourth.plan() == ["a", "b"]
    assert fourth.matrix["include"][1]["reasons"] == ["gguf/Q8_0:gate: changed since published"]
    b_before = {name: dict(f) for name, f in hub.repos["t/b-GGUF"].files.items()}
    legs = fourth.legs()
    assert legs["a"].returncode == 0, legs["a"].stderr[-2000:]
    assert legs["b"].returncode == 1
    assert len(hub.repos["t/a-GGUF"].commits) == 2 and len(hub.repos["t/b-GGUF"].commits) == 1
    assert hub.repos["t/b-GGUF"].files == b_before  # left exactly as it was
    proc, summary = fourth.summary()
    assert proc.returncode == 1
    assert summary.startswith("### quantforge nightly: FAILED (2 legs, 1 failed)")
    assert "**b/gguf/Q8_0:gate** (b): gate gguf/Q8_0 failed: ΔPPL +" in summary
    assert "| a | ok |" in summary and "t/a-GGUF (new commit)" in summary
    everything = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                         and p.suffix in (".json", ".md", ".log"))
    assert TOKEN not in everything
