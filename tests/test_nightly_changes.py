"""A maintainer's week on fresh runners: each night runs the shipped workflow's plan and build steps in new
folders, with a new work dir and Hugging Face cache, against a loopback Hub (the real huggingface_hub client).
What a change costs must be what the change needs, read from the repo's own record (quantforge.json):

    gate only          gate + publish run; no source download, no artifact upload; the card shows the new gate
    a type added       only that type's steps and what they need upstream run; only its file is uploaded
    README-only commit 0 legs, and plan says the source has a new commit with the same files
    a type removed     its file leaves the repo in one commit; a file a person added stays
    a new card         one commit holding README.md and quantforge.json only
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from hub_server import HubServer
from test_nightly import Nightly

pytestmark = pytest.mark.slow

TARGETS = """
defaults:
  publish: {{to: hub, namespace: t}}
  evaluation: {{ctx: 64, chunks: 4, max_ppl_increase: {{gguf: {gate}}}, tokenizer_check: false}}
models:
  - {{name: a, source: org/src-a, formats: {{gguf: {{types: [{types}]}}}}}}
"""
SOURCE_FILES = "/org/src-a/resolve/"
# A card template edited, as a quantforge upgrade would: the legs' Python picks this up before quantforge runs
NEW_CARD = """
import quantforge.card as card
_template = card.card_template
card.card_template = lambda name: _template(name) + "\\n<!-- card template v2 -->\\n"
"""


def targets(gate: float = 0.5, types: str = "Q8_0") -> str:
    return TARGETS.format(gate=gate, types=types)


class Week:
    def __init__(self, root: Path, hub: HubServer):
        self.root, self.hub, self.nights = root, hub, 0
        self.costs: list[dict] = []

    def night(self, text: str, **env: str) -> tuple[list[str], dict[str, dict]]:
        """Plan and build one night; (legs, label -> step of leg a's report)."""
        self.nights += 1
        self.hub.requests.clear()
        self.hub.bytes_in = self.hub.bytes_out = 0
        nightly = Nightly(self.root / f"night-{self.nights}", self.hub, text)
        nightly.extra_env = env
        legs = nightly.plan()
        done = nightly.legs()
        assert all(p.returncode == 0 for p in done.values()), {m: p.stderr[-3000:] for m, p in done.items()}
        steps = {}
        if legs:
            report = json.loads((nightly.root / "summary" / "reports" / "a.json").read_text())
            steps = {s["label"]: s for s in report["steps"]}
        self.costs.append({"night": self.nights, "legs": legs,
                           "built": sorted(label for label, s in steps.items() if s["status"] == "built"),
                           "requests": len(self.hub.api_requests()), "downloaded": self.source_bytes(),
                           "uploaded": self.hub.bytes_in})
        return legs, steps

    def source_bytes(self) -> int:
        repo = self.hub.repos["org/src-a"]
        return sum(repo.files[p.split("/", 5)[5]]["size"] for m, p in self.hub.api_requests()
                   if m == "GET" and p.startswith(SOURCE_FILES))


def built(steps: dict[str, dict]) -> set[str]:
    return {label for label, s in steps.items() if s["status"] == "built"}


def last_commit(hub: HubServer) -> dict:
    return hub.repos["t/a-GGUF"].commits[-1]


@pytest.fixture
def hub(tiny_models):
    with HubServer() as server:
        server.seed("org/src-a", tiny_models("llama"))
        yield server


def test_a_week_of_changes_costs_what_each_change_needs(hub, tmp_path, tiny_models, capsys):
    week = Week(tmp_path, hub)
    legs, steps = week.night(targets())
    assert legs == ["a"] and "a/gguf:publish" in built(steps)
    first = dict(hub.repos["t/a-GGUF"].files)

    # ---- a gate changes: the recorded measurements are judged again; nothing is downloaded or uploaded
    legs, steps = week.night(targets(gate=0.75))
    assert legs == ["a"]
    assert built(steps) == {"a/gguf/Q8_0:gate", "a/gguf:publish"}
    assert not [p for m, p in hub.api_requests() if p.startswith(SOURCE_FILES)]
    assert hub.uploads() == []
    assert last_commit(hub)["files"] == ["README.md", "quantforge.json"]
    card = hub.repos["t/a-GGUF"].files["README.md"]["content"].decode()
    assert "ΔPPL ≤ +75.0%" in card and "ΔPPL ≤ +50.0%" not in card
    record = json.loads(hub.repos["t/a-GGUF"].files["quantforge.json"]["content"])
    assert record["artifacts"]["Q8_0"]["check"]["gate"]["max_ppl_increase"] == 0.75

    # ---- a type is added: its steps and what they need upstream; only its file goes up
    legs, steps = week.night(targets(gate=0.75, types="Q8_0, Q4_0"))
    assert legs == ["a"]
    assert {label for label in built(steps) if "Q8_0" in label} == set()
    assert {"a/gguf/Q4_0:quantize", "a/gguf/Q4_0:gate", "a/gguf/Q4_0:upload", "a:source", "a/gguf:convert",
            "a/gguf:publish"} <= built(steps)
    assert steps["a/gguf/Q8_0:quantize"]["status"] in ("reused", "not-needed")
    assert last_commit(hub)["files"] == ["README.md", "a-Q4_0.gguf", "quantforge.json"]
    assert hub.repos["t/a-GGUF"].files["a-Q8_0.gguf"] == first["a-Q8_0.gguf"]

    # ---- upstream commits a new README only: no leg, and plan says why
    moved = tmp_path / "moved"
    shutil.copytree(tiny_models("llama"), moved)
    (moved / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a new commit that changes the card only\n")
    new_commit = hub.seed("org/src-a", moved, "README only")
    capsys.readouterr()
    legs, steps = week.night(targets(gate=0.75, types="Q8_0, Q4_0"))
    assert legs == []
    plan_log = (tmp_path / f"night-{week.nights}" / "plan" / "stderr.log").read_text()
    assert f"a: source: new commit {new_commit[:12]}, same files" in plan_log

    # ---- a type is removed: its file goes in one commit; what a person added stays
    hub.seed("t/a-GGUF", _folder(tmp_path / "by-hand", {"NOTES.md": "kept: a person wrote this\n"}), "by hand")
    legs, steps = week.night(targets(gate=0.75, types="Q8_0"))
    assert legs == ["a"]
    assert built(steps) == {"a/gguf:publish"}
    commit = last_commit(hub)
    assert commit["deleted"] == ["a-Q4_0.gguf"] and commit["files"] == ["README.md", "quantforge.json"]
    assert sorted(hub.repos["t/a-GGUF"].files) == ["NOTES.md", "README.md", "a-Q8_0.gguf", "quantforge.json"]
    assert "**No longer published:** a-Q4_0.gguf" in hub.repos["t/a-GGUF"].files["README.md"]["content"].decode()

    # ---- a new card template: one commit with README.md and quantforge.json only
    legs, steps = week.night(targets(gate=0.75, types="Q8_0"), PYTHONPATH=str(_folder(
        tmp_path / "card-v2", {"sitecustomize.py": NEW_CARD})))
    assert legs == ["a"]
    assert built(steps) == {"a/gguf:publish"}
    assert last_commit(hub)["files"] == ["README.md", "quantforge.json"]
    assert "card template v2" in hub.repos["t/a-GGUF"].files["README.md"]["content"].decode()
    assert not [p for m, p in hub.api_requests() if p.startswith(SOURCE_FILES)] and hub.uploads() == []

    with capsys.disabled():
        print("\nnight  legs  steps built  requests  source bytes downloaded  bytes uploaded", file=sys.stderr)
        for cost in week.costs:
            print(f"{cost['night']:>5}  {len(cost['legs']):>4}  {len(cost['built']):>11}  {cost['requests']:>8}  "
                  f"{cost['downloaded']:>23}  {cost['uploaded']:>14}", file=sys.stderr)


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path
