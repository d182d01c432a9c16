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
