"""What a publish leaves at its destination, and whether a later build notices when that changed: a folder publish
killed mid-copy, rerun, is the folder an uninterrupted one makes; an edited, truncated or foreign file in a
published repo is found by `plan` and `build`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantforge.publish.localdir import LocalDirPublisher, remove_debris
from quantforge.store import sha256_file

REPO = "acme/m-GPTQ"


def _files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A checkpoint, the manifest naming its files, and the card: what a publish step hands a publisher."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    # a checkpoint's files: one sorts before quantforge.json, one after
    contents = {"model.safetensors": os.urandom(3_000_000), "tokenizer.json": os.urandom(2_000_000),
                "quantforge.json": json.dumps({"files": ["model.safetensors", "tokenizer.json"]}).encode(),
                "README.md": b"# m\n"}
    out = {}
    for name, data in contents.items():
        (src / name).write_bytes(data)
        out[name] = (src / name, sha256_file(src / name))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A publish in a child process whose copy of one file stops half-way, so that the test can SIGKILL it there
STALLED_PUBLISH = """
import fcntl, json, re, shutil, sys, time
from pathlib import Path
from quantforge.publish import localdir

root, files, stall = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
copy = shutil.copyfileobj

def stalling(fin, fout, length=0):
    if localdir._PARTIAL.fullmatch(Path(fout.name).name)["name"] == stall:
        fout.write(fin.read(4096))
        fout.flush()
        print("stalled", flush=True)
        time.sleep(120)
    copy(fin, fout, length)

def no_reflink(*args):
    raise OSError("no reflinks here: copy the bytes")

shutil.copyfileobj, fcntl.ioctl = stalling, no_reflink
localdir.LocalDirPublisher(root).publish("acme/m-GPTQ", {n: (Path(p), s) for n, (p, s) in files.items()},
                                         private=False, message="m")
"""


@pytest.mark.parametrize("stall", ["model.safetensors", "tokenizer.json", "quantforge.json", "README.md"])
def test_a_folder_publish_killed_mid_copy_reruns_to_the_folder_an_uninterrupted_one_makes(tmp_path, stall):
    files = _files(tmp_path)
    LocalDirPublisher(tmp_path / "reference").publish(REPO, files, private=False, message="m")
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", STALLED_PUBLISH, str(out),
                              json.dumps({n: [str(p), s] for n, (p, s) in files.items()}), stall],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "stalled"
    child.send_signal(signal.SIGKILL)
    child.wait()
    repo = out / REPO
    left = sorted(p.name for p in repo.iterdir())
    assert any(name.startswith(f".{stall}.{child.pid}-") and name.endswith(".partial") for name in left), left
    # the order holds at any kill: files, then the manifest, then the card
    assert "README.md" not in left
    if "quantforge.json" in left:
        assert {"model.safetensors", "tokenizer.json"} <= set(left)

    LocalDirPublisher(out).publish(REPO, files, private=False, message="m")
    assert _snapshot(repo) == _snapshot(tmp_path / "reference" / REPO)


def test_only_our_own_temp_files_of_finished_writers_are_debris(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".m-Q8_0.gguf.{gone}-0123abcd.partial": False,  # its writer is gone: removed
                 f".m-Q8_0.gguf.{alive.pid}-0123abcd.partial": True,  # still being written by another publish
                 f".m-Q8_0.gguf.{os.getpid()}-0123abcd.partial": True,  # this process's, maybe another thread's
                 ".notes.partial": True, f"m.{gone}-0123abcd.partial": True,  # not our names: a person's files
                 f".m.gguf.{gone}-NOTHEX00.partial": True, "m-Q8_0.gguf": True}
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / f".c.json.{gone}-0123abcd.partial").write_bytes(b"x")
        assert remove_debris(tmp_path) == [f".m-Q8_0.gguf.{gone}-0123abcd.partial",
                                           f"sub/.c.json.{gone}-0123abcd.partial"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(n for n, kept in names.items()
                                                                                 if kept)
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------------ published copies, checked

TARGETS = """
defaults:
  publish: {{to: {to}, namespace: t}}
  evaluation: {{ctx: 64, chunks: 2, max_ppl_increase: {{gguf: 10}}, tokenizer_check: false}}
models:
  - name: t
    source: {source}
    formats: {{gguf: {{types: [Q5_0]}}}}
"""


def quantforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _publish_reasons(targets: Path, work: Path, *flags: str, env: dict[str, str] | None = None) -> list[str]:
    """What `plan --json` says of the publish step: its reasons, rendered as plan prints them."""
    from quantforge.console import reason_text
    from quantforge.core.step import Reason

    proc = quantforge("plan", str(targets), "--work-dir", str(work), "--json", *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    step = next(s for s in json.loads(proc.stdout)["steps"] if s["kind"] == "publish")
    return [reason_text(Reason.from_json(r)) for r in step["reasons"]]


def _build(targets: Path, work: Path, *flags: str, env: dict[str, str] | None = None) -> dict:
    proc = quantforge("build", str(targets), "--work-dir", str(work), "--json", *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _publish_status(report: dict) -> str:
    return next(s["status"] for s in report["steps"] if s["kind"] == "publish")


@pytest.mark.slow
def test_an_edited_published_folder_is_noticed_and_republished_from_the_cache(tmp_path, tiny_models):
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS.format(to='"dir:./out"', source=tiny_models("llama")))
    work = tmp_path / "work"
    _build(targets, work)
    repo = tmp_path / "out" / "t" / "t-GGUF"
    gguf = repo / "t-Q5_0.gguf"
    good = gguf.read_bytes()
    record = json.loads((repo / "quantforge.json").read_text())
    recorded = record["files"]["t-Q5_0.gguf"]
    assert (recorded["sha256"], recorded["size"]) == (sha256_file(gguf), len(good))

    # 16 bytes flipped, the size kept: a plain plan cannot tell (it compares sizes), --verify-published can
    with open(gguf, "r+b") as f:
        f.seek(len(good) // 2)
        f.write(bytes(b ^ 0xFF for b in good[len(good) // 2:len(good) // 2 + 16]))
    assert _publish_reasons(targets, work) == []
    reasons = _publish_reasons(targets, work, "--verify-published")
    assert len(reasons) == 1 and reasons[0].startswith("published file changed: t-Q5_0.gguf (sha256 "), reasons
    assert _publish_status(_build(targets, work)) == "reused"  # a plain build does not read it either
    report = _build(targets, work, "--verify-published")
    assert _publish_status(report) == "built"  # republished from the cache: nothing upstream ran
    assert {s["status"] for s in report["steps"] if s["kind"] != "publish"} == {"reused"}
    assert gguf.read_bytes() == good

    # truncated: the size tells, so a plain build notices and repairs it
    gguf.write_bytes(b"")
    assert _publish_reasons(targets, work) == [f"published file changed: t-Q5_0.gguf (0 bytes, {len(good)} "
                                               "published)"]
    assert _publish_status(_build(targets, work)) == "built" and gguf.read_bytes() == good

    # with no work dir (a fresh runner), the repo's quantforge.json is what the copy is checked against
    gguf.write_bytes(good[:-1])
    assert _publish_reasons(targets, tmp_path / "fresh") == [
        f"published file changed: t-Q5_0.gguf ({len(good) - 1} bytes, {len(good)} published)"]
    gguf.write_bytes(good)
    assert _publish_reasons(targets, tmp_path / "fresh") == []

    # a file its publication does not list (another build's type, a person's notes) is reported, and not stale
    (repo / "t-Q4_0.gguf").write_bytes(b"GGUF from another build")
    for work_dir in (work, tmp_path / "fresh"):
        proc = quantforge("plan", str(targets), "--work-dir", str(work_dir), "--json")
        plan = json.loads(proc.stdout)
        assert plan["warnings"] == [{"step": "t/gguf:publish", "repo_id": "t/t-GGUF", "unlisted": ["t-Q4_0.gguf"],
                                     "message": "t/t-GGUF holds t-Q4_0.gguf, which its publication does not list "
                                                "(left by a build of other types, or added by hand)"}]
        assert all(s["status"] == "up-to-date" for s in plan["steps"] if s["kind"] == "publish")
    text = quantforge("plan", str(targets), "--work-dir", str(work)).stdout
    assert "warning: t/t-GGUF holds t-Q4_0.gguf, which its publication does not list" in text


@pytest.mark.slow
def test_a_changed_hub_copy_is_noticed_by_its_lfs_sha256_without_a_download(tmp_path, tiny_models):
    from hub_server import HubServer

    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS.format(to="hub", source=tiny_models("llama")))
    work = tmp_path / "work"
    with HubServer() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf")}
        _build(targets, work, env=env)
        files = hub.repos["t/t-GGUF"].files
        good = files["t-Q5_0.gguf"]["lfs"]
        files["t-Q5_0.gguf"] = {**files["t-Q5_0.gguf"], "lfs": "0" * 64}  # other content, same size
        hub.requests.clear()
        reasons = _publish_reasons(targets, work, env=env)  # the listing the check makes carries LFS hashes
        assert reasons == [f"published file changed: t-Q5_0.gguf (sha256 {'0' * 12}…, {good[:12]}… published)"]
        # no artifact downloaded (quantforge.json, the repo's record, is read: one request)
        assert not [p for m, p, _ in hub.requests if "/resolve/" in p and p.endswith(".gguf")]
        # a fresh runner judges by quantforge.json alone (one request per repo); --verify-published also lists
        assert _publish_reasons(targets, tmp_path / "fresh", env=env) == []
        assert _publish_reasons(targets, tmp_path / "fresh", "--verify-published", env=env) == reasons
        assert _publish_status(_build(targets, work, env=env)) == "built"
        assert hub.repos["t/t-GGUF"].files["t-Q5_0.gguf"]["lfs"] == good
        assert _publish_reasons(targets, work, env=env) == []
