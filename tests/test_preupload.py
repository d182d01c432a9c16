"""A leg publishing to the Hub uploads each artifact as soon as its gate has passed and commits them all at the
end, so that with --evict it holds one artifact at a time: about source + intermediate + the largest artifact,
where it used to hold every artifact of a format until the publish step. Real huggingface_hub client, loopback
Hub (tests/hub_server.py), tiny models; the size-capped disks need root (tests/disks.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from disks import highest, small_disk
from hub_server import HubServer
from tiny_models import fake_checkpoint

from quantforge.core.engine import must_run
from quantforge.core.step import BuildOptions, PlanContext, Step, StepContext, StepOutput
from quantforge.pipeline import build_plan, load_targets
from quantforge.steps.disk import disk_use
from quantforge.store import WorkDir, canonical_json, sha256_file

TOKEN = "hf_preuploadTokenNeverPrinted7"
TYPES = ["Q8_0", "Q4_0", "F16"]


def quantforge(*args: str, env: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, env=env)


def targets_text(to: str, gates: str = "gguf: 0.5") -> str:
    return (f"defaults:\n  publish: {{to: '{to}', namespace: t}}\n"
            f"  formats: {{gguf: {{types: [{', '.join(TYPES)}]}}}}\n"
            f"  evaluation: {{ctx: 64, chunks: 4, max_ppl_increase: {{{gates}}}, tokenizer_check: false}}\n"
            "models:\n  - {name: d, source: org/src}\n")


def hub_env(hub: HubServer, hf_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(hf_home)}


# ------------------------------------------------------------------------------------------------ the plan

def test_a_hub_leg_uploads_each_artifact_after_its_gate_and_expects_one_artifact_at_a_time(tmp_path, monkeypatch):
    from huggingface_hub import constants

    checkpoint = fake_checkpoint(tmp_path / "ckpt", (1000, 1000))
    with HubServer() as hub:
        hub.seed("org/src", checkpoint)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        plans = {}
        for to in ("hub", "dir:./out"):
            path = tmp_path / f"{to[:3]}.yaml"
            path.write_text(targets_text(to))
            plans[to] = build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "work")))
    steps = plans["hub"].steps
    labels = [s.label for s in steps]
    for qtype in TYPES:  # each upload runs right after its gate, before the next type is made
        assert labels.index(f"d/gguf/{qtype}:upload") == labels.index(f"d/gguf/{qtype}:gate") + 1
    upload = steps[labels.index("d/gguf/Q8_0:upload")]
    assert dict(upload.params) == {"repo_id": "t/d-GGUF", "private": False, "format": "gguf",
                                   "max_file_size": 48_000_000_000}
    # keyed by its artifact alone; it waits for its gate (a changed gate uploads nothing again)
    assert set(upload.inputs) == {"artifact"} and [s.label for s in upload.after] == ["d/gguf/Q8_0:gate"]
    assert str(tmp_path) not in canonical_json(upload.fingerprint())
    publish = steps[-1]
    assert {r for r in publish.inputs if r.startswith("upload:")} == {f"upload:{t}" for t in TYPES}
    # the card reads their data; the bytes went ahead (and a destination's record of any of them serves)
    assert publish.data_only == {"source", "tokens", *(f"{role}:{t}" for t in TYPES
                                                       for role in ("artifact", "check", "upload"))}
    assert not any(s.kind == "publish.upload" for s in plans["dir:./out"].steps)  # a folder: as before

    # the expected peak (plan --github-matrix, the disk preflight): source + intermediate + the largest artifact
    work = WorkDir(tmp_path / "work")
    todo = must_run(plans["hub"], work, remote=False)
    [evicting] = disk_use(steps, todo, work_root=work.root, evict=True, one_disk=True)
    assert set(evicting.at_peak) == {"d source", "d/gguf:convert", "d/gguf/F16:quantize"}
    source = sum(p.stat().st_size for p in checkpoint.iterdir())
    intermediate = evicting.at_peak["d/gguf:convert"]
    assert evicting.peak_bytes == source + 2 * intermediate  # F16, the largest, weighs what the intermediate does
    [keeping] = disk_use(steps, todo, work_root=work.root, evict=False, one_disk=True)
    assert {f"d/gguf/{t}:quantize" for t in TYPES} <= set(keeping.at_peak)


# ------------------------------------------------------------------------------------------------ one upload

def built_output(folder: Path, data: dict) -> StepOutput:
    """A step output as the engine commits it: its files, with sizes and hashes, and its data."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return StepOutput(folder, {"files": files, "data": data})


def upload_then_commit(tmp_path: Path, monkeypatch, fmt: str, artifact: StepOutput, max_file_size: int):
    """Run an upload step on `artifact`, delete the artifact (as --evict does), then commit what the upload left:
    (the upload's output folder, its data, the loopback Hub's repo)."""
    from huggingface_hub import constants

    from quantforge.publish.hub import HubPublisher
    from quantforge.publish.upload import UPLOAD_KIND, run_upload, uploaded_files

    step = Step(UPLOAD_KIND, f"m/{fmt}:upload", {"repo_id": "t/m", "private": False, "format": fmt,
                                                 "max_file_size": max_file_size}, model="m", fmt=fmt)
    out = tmp_path / "upload"
    out.mkdir()
    with HubServer() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        data = run_upload(step, StepContext(step, out, tmp_path / "upload.log", {"artifact": artifact},
                                            BuildOptions()))
        assert hub.repos["t/m"].commits == []
        shutil.rmtree(artifact.dir)
        kept, ahead = uploaded_files(built_output(out, json.loads(json.dumps(data))))
        HubPublisher().publish("t/m", kept.files, private=False, message="m", preuploaded=ahead)
        assert len(hub.repos["t/m"].commits) == 1
        return out, data, hub.repos["t/m"], hub


def test_an_upload_of_a_split_gguf_sends_its_shards_and_keeps_none(tmp_path, monkeypatch):
    import numpy as np
    from gguf import GGUFWriter

    folder = tmp_path / "artifact"
    folder.mkdir()
    writer = GGUFWriter(str(folder / "m-Q8_0.gguf"), "llama")
    for i in range(3):
        writer.add_tensor(f"blk.{i}.w", np.full((100, 1000), i, dtype=np.float32))  # 400 kB each
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    artifact = built_output(folder, {"file": "m-Q8_0.gguf"})
    whole = artifact.files()["m-Q8_0.gguf"]["sha256"]
    out, data, repo, hub = upload_then_commit(tmp_path, monkeypatch, "gguf", artifact, 600_000)
    shards = [f"m-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert data["shards"] == shards and data["sha256"] == whole
    assert [p.name for p in out.rglob("*")] == []  # the shards were deleted once uploaded
    assert sorted(repo.files) == shards
    assert all(repo.files[s]["lfs"] == data["files"][s]["sha256"] for s in shards)
    assert len(hub.uploads()) == 3


def test_an_upload_keeps_the_small_files_a_commit_carries_and_sends_the_rest_ahead(tmp_path, monkeypatch):
    folder = tmp_path / "artifact"
    (folder / "checkpoint").mkdir(parents=True)
    weights = os.urandom(1_200_000)  # the loopback Hub takes files over 1 MB (and .gguf) as LFS
    (folder / "checkpoint" / "model.safetensors").write_bytes(weights)
    (folder / "checkpoint" / "config.json").write_text('{"model_type": "llama"}')
    artifact = built_output(folder, {"dir": "checkpoint"})
    out, data, repo, _ = upload_then_commit(tmp_path, monkeypatch, "gptq", artifact, 48_000_000_000)
    assert data["files"]["model.safetensors"]["lfs"] and "kept" in data["files"]["config.json"]
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == ["regular/config.json"]
    assert repo.files["model.safetensors"]["lfs"] == hashlib.sha256(weights).hexdigest()
    assert repo.files["config.json"]["content"] == b'{"model_type": "llama"}'


# ------------------------------------------------------------------------------------------------ builds

@pytest.fixture
def hub(tiny_models):
    with HubServer() as server:
        server.seed("org/src", tiny_models("llama"))
        yield server


def most_artifacts_at_once(work: Path):
    """The most GGUF artifacts (built, or being written) the work dir held at once while the block ran (sampled
    every 10 ms; an artifact lives for seconds: its verification and evaluation)."""
    return highest(lambda: len([*work.glob("steps/gguf.quantize/*/*.gguf"), *work.glob("tmp/gguf.quantize-*/*.gguf")]))


def steps_of(proc: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    return {s["label"]: s for s in json.loads(proc.stdout)["steps"]}


@pytest.mark.slow
def test_an_evicting_hub_leg_fits_source_intermediate_and_the_largest_artifact(hub, tmp_path):
    # the tiny Llama: source 34 MB, intermediate and F16 24 MB each, Q8_0 and Q4_0 17 MB each. Holding one artifact
    # at a time needs about 83 MB; holding every artifact until the publish step (as before) 116 MB
    capacity = "96m"
    with small_disk(tmp_path / "disk", capacity) as disk:
        targets = tmp_path / "targets.yaml"
        targets.write_text(targets_text("hub"))
        env = hub_env(hub, disk / "hf")
        matrix = quantforge("plan", str(targets), "--github-matrix", "--work-dir", str(disk / "work"), env=env)
        assert matrix.returncode == 0, matrix.stderr
        [leg] = json.loads(matrix.stdout)["include"]
        with most_artifacts_at_once(disk / "work") as most:
            proc = quantforge("build", str(targets), "--work-dir", str(disk / "work"), "--evict", "--json", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert most == [1]  # the work dir never held two artifacts at once
        steps = steps_of(proc)
        work = WorkDir(disk / "work")
        assert not list(work.root.glob("steps/**/*.gguf"))  # every artifact evicted; no upload kept a copy
        sizes = {label: sum(f["size"] for f in work.evicted(s["kind"], s["key"])["files"].values())
                 for label, s in steps.items() if s["kind"] in ("gguf.convert", "gguf.quantize")}
    source = sum(f["size"] for f in hub.repos["org/src"].files.values())
    artifacts = {label: size for label, size in sizes.items() if label.endswith(":quantize")}
    one_at_a_time = source + sizes["d/gguf:convert"] + max(artifacts.values())
    # the disk was big enough for one artifact at a time, not for all of them
    assert one_at_a_time < 96 * 2**20 < source + sizes["d/gguf:convert"] + sum(artifacts.values())
    assert abs(leg["disk_bytes"] - one_at_a_time) < 0.05 * one_at_a_time  # the nightly's estimate agrees

    assert all(steps[f"d/gguf/{t}:upload"]["status"] == "built" for t in TYPES)
    repo = hub.repos["t/d-GGUF"]
    assert len(repo.commits) == 1  # published in one commit
    record = json.loads(repo.files["quantforge.json"]["content"])
    for qtype in TYPES:
        name, sha = f"d-{qtype}.gguf", record["artifacts"][qtype]["sha256"]
        assert repo.files[name]["lfs"] == sha == hashlib.sha256(hub.lfs[sha]).hexdigest()
        assert hub.uploads().count(f"/lfs-upload/{sha}") == 1
        assert set(steps[f"d/gguf/{qtype}:upload"]["data"]["files"]) == {name}
    assert f"d-{TYPES[0]}.gguf" in repo.files["README.md"]["content"].decode()
    assert record["build"]["steps"]["d/gguf/Q8_0:upload"] == steps["d/gguf/Q8_0:upload"]["key"]


@pytest.mark.slow
def test_a_failed_gate_uploads_nothing_of_its_artifact_and_an_expired_upload_is_a_clear_error(hub, tmp_path):
    targets = tmp_path / "targets.yaml"
    work = tmp_path / "work"
    env = hub_env(hub, tmp_path / "hf")
    old = tmp_path / "old"
    old.mkdir()
    (old / "README.md").write_text("# an earlier release\n")
    hub.seed("t/d-GGUF", old, "an earlier release")
    before = {name: dict(f) for name, f in hub.repos["t/d-GGUF"].files.items()}

    # ---- Q4_0 misses its gate: Q8_0 and F16 go up ahead, Q4_0 never does, and the repo is left as it was
    targets.write_text(targets_text("hub", "gguf: 0.5, gguf/Q4_0: 0.0"))
    failed = quantforge("build", str(targets), "--work-dir", str(work), "--evict", "--keep-going", "--json", env=env)
    assert failed.returncode == 1
    steps = steps_of(failed)
    assert steps["d/gguf/Q4_0:gate"]["status"] == "failed" and steps["d/gguf/Q4_0:upload"]["status"] == "skipped"
    assert steps["d/gguf/Q8_0:upload"]["status"] == "built" and steps["d/gguf:publish"]["status"] == "skipped"
    q4 = steps["d/gguf/Q4_0:quantize"]
    q4_sha = WorkDir(work).evicted(q4["kind"], q4["key"])["files"]["d-Q4_0.gguf"]["sha256"]
    q8_sha = steps["d/gguf/Q8_0:upload"]["data"]["files"]["d-Q8_0.gguf"]["sha256"]
    assert f"/lfs-upload/{q4_sha}" not in hub.uploads() and f"/lfs-upload/{q8_sha}" in hub.uploads()
    assert len(hub.repos["t/d-GGUF"].commits) == 1 and hub.repos["t/d-GGUF"].files == before

    # ---- the gate is relaxed, but the Hub has dropped the uncommitted Q8_0 upload: the commit is refused, clearly
    del hub.lfs[q8_sha]
    targets.write_text(targets_text("hub"))
    refused = quantforge("build", str(targets), "--work-dir", str(work), "--evict", "--json", env=env)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    steps = steps_of(refused)
    assert steps["d/gguf/Q8_0:quantize"]["status"] == "not-needed"  # the publish step reads only its data
    assert steps["d/gguf/Q4_0:upload"]["status"] == "built"
    publish = steps["d/gguf:publish"]
    assert publish["status"] == "failed" and "the Hub no longer holds d-Q8_0.gguf, uploaded ahead" in publish["error"]
    assert "nothing was published" in publish["error"] and "d/gguf/Q8_0:upload" in publish["hint"]
    assert len(hub.repos["t/d-GGUF"].commits) == 1 and hub.repos["t/d-GGUF"].files == before

    # ---- the hint says what to do; doing it publishes everything in one commit
    [folder] = re.findall(r"rm -r (\S+)\)", publish["hint"])
    shutil.rmtree(folder)
    done = quantforge("build", str(targets), "--work-dir", str(work), "--evict", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps_of(done)["d/gguf/Q8_0:upload"]["status"] == "built"
    repo = hub.repos["t/d-GGUF"]
    assert len(repo.commits) == 2 and repo.files["d-Q8_0.gguf"]["lfs"] == q8_sha
    assert {f"d-{t}.gguf" for t in TYPES} <= set(repo.files)
    logs = "".join(p.read_text(errors="replace") for p in (work / "logs").glob("*.log"))
    assert TOKEN not in failed.stderr + refused.stderr + done.stderr + logs
