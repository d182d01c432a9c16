"""The Hub publisher against a loopback Hub, with the real huggingface_hub client."""

from __future__ import annotations

import json
import logging

import pytest
from hub_server import HubServer

from quantforge.errors import PreuploadRejected, PublishError
from quantforge.publish.hub import HubPublisher, PreuploadedFile
from quantforge.store import sha256_file

TOKEN = "hf_quantforgeTestTokenDoNotLeak123"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the documented LFS path
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with HubServer() as server:
        yield server


@pytest.fixture
def repo_files(tmp_path):
    files = {"model-Q4_K_M.gguf": b"GGUF" + bytes(range(256)) * 40, "model-Q8_0.gguf": b"GGUF" + b"\x01" * 9000,
             "README.md": b"---\nlibrary_name: gguf\n---\n# card\n", "quantforge.json": b'{"v": 1}\n'}

    def make(**changes: bytes) -> dict:
        out = {}
        for name, content in {**files, **changes}.items():
            path = tmp_path / name
            path.write_bytes(content)
            out[name] = (path, sha256_file(path))
        return out

    return make


def publisher(hub: HubServer) -> HubPublisher:
    return HubPublisher(endpoint=hub.url, token=TOKEN, backoff_seconds=0.01)


def test_first_push_creates_the_repo_in_one_commit(hub, repo_files):
    result = publisher(hub).publish("acme/m-GGUF", repo_files(), private=True, message="quantforge: m")
    repo = hub.repos["acme/m-GGUF"]
    assert repo.private and len(repo.commits) == 1 and repo.commits[0]["summary"] == "quantforge: m"
    assert set(repo.files) == {"model-Q4_K_M.gguf", "model-Q8_0.gguf", "README.md", "quantforge.json"}
    assert repo.files["model-Q8_0.gguf"]["lfs"] and not repo.files["README.md"]["lfs"]
    assert sorted(result.uploaded) == sorted(repo.files) and result.commit == repo.commits[0]["oid"]


def test_identical_push_makes_no_commit(hub, repo_files):
    publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="one")
    puts = len(hub.uploads())
    again = publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="two")
    assert again.uploaded == [] and again.commit is None
    assert len(hub.repos["acme/m-GGUF"].commits) == 1 and len(hub.uploads()) == puts
    assert len([r for r in hub.requests if "/commit/" in r[1]]) == 1  # the second push did not even try


def test_changed_artifact_makes_one_commit_uploading_only_it(hub, repo_files):
    publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="one")
    puts = len(hub.uploads())
    result = publisher(hub).publish("acme/m-GGUF", repo_files(**{"model-Q8_0.gguf": b"GGUF" + b"\x02" * 9000}),
                                    private=False, message="two")
    assert result.uploaded == ["model-Q8_0.gguf"]
    commits = hub.repos["acme/m-GGUF"].commits
    assert len(commits) == 2 and commits[1]["files"] == ["model-Q8_0.gguf"]
    assert len(hub.uploads()) == puts + 1


@pytest.mark.parametrize(("method", "fragment", "action"), [
    ("PUT", "/lfs-upload/", 500), ("POST", "/commit/", 429), ("POST", "/commit/", 503),
    ("POST", "/commit/", "drop"), ("POST", "/preupload/", 502), ("GET", "/tree/", "drop")])
def test_transient_failures_are_retried(hub, repo_files, method, fragment, action):
    hub.fail(method, fragment, action, times=2)
    result = publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="one")
    assert hub.faults == [[method, fragment, action, 0]]  # both injected failures were served, then retried
    assert result.commit and len(hub.repos["acme/m-GGUF"].commits) == 1
    assert len(hub.repos["acme/m-GGUF"].files) == 4


def test_persistent_failure_is_a_clear_error_and_leaves_no_commit(hub, repo_files):
    publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="one")
    hub.fail("POST", "/commit/", 500, times=100)
    with pytest.raises(PublishError, match=r"committing to acme/m-GGUF failed: HTTP 500"):
        publisher(hub).publish("acme/m-GGUF", repo_files(**{"model-Q8_0.gguf": b"GGUF changed"}),
                               private=False, message="two")
    repo = hub.repos["acme/m-GGUF"]
    assert len(repo.commits) == 1 and repo.files["model-Q8_0.gguf"]["size"] == 9004


def test_a_repo_listing_gives_sizes_and_lfs_hashes(hub, repo_files):
    from quantforge.publish.copies import HeldFile

    files = repo_files()
    pub = publisher(hub)
    pub.publish("acme/m-GGUF", files, private=False, message="one")
    held = pub.held("acme/m-GGUF")
    # the size of every file, and the sha256 the Hub keeps of an LFS file (a regular file's it does not know)
    assert held["model-Q8_0.gguf"] == HeldFile(files["model-Q8_0.gguf"][0].stat().st_size, files["model-Q8_0.gguf"][1])
    assert held["README.md"] == HeldFile(files["README.md"][0].stat().st_size, None)
    del hub.repos["acme/m-GGUF"].files["model-Q8_0.gguf"]
    assert "model-Q8_0.gguf" not in pub.held("acme/m-GGUF")
    assert pub.held("acme/other") is None


def test_the_token_is_sent_but_never_logged(hub, repo_files, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    hub.fail("POST", "/commit/", 500, times=1)
    publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="one")
    hub.fail("POST", "/commit/", 500, times=100)
    with pytest.raises(PublishError) as info:
        publisher(hub).publish("acme/m-GGUF", repo_files(**{"README.md": b"new"}), private=False, message="two")
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    out = capsys.readouterr()
    assert TOKEN not in caplog.text + out.out + out.err + str(info.value)
    assert "retrying" in caplog.text  # the retries were logged, without the token


def test_a_refused_token_is_named_as_such(repo_files):
    with HubServer(accept_token="right") as server:
        wrong = HubPublisher(endpoint=server.url, token="wrong", backoff_seconds=0.01)
        with pytest.raises(PublishError, match="refused the token"):
            wrong.publish("acme/m-GGUF", repo_files(), private=False, message="m")
        assert "acme/m-GGUF" not in server.repos


# ------------------------------------------------------------------------- uploads ahead of the commit

def test_a_preuploaded_object_is_committed_without_its_file(hub, repo_files, tmp_path):
    """publish/upload.py's contract with huggingface_hub: LFS files sent ahead (preupload_lfs_files) are committed
    later, by another process, from their record alone. hub.preuploaded_addition builds that commit operation
    through huggingface_hub's private attributes: if a release changes them, this test fails."""
    files = repo_files()
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    ahead = {name: files[name] for name in ("model-Q4_K_M.gguf", "model-Q8_0.gguf")}
    sent = publisher(hub).preupload("acme/m-GGUF", {**ahead, "config.json": (config, sha256_file(config))},
                                    private=True)
    repo = hub.repos["acme/m-GGUF"]
    assert repo.private and repo.commits == []  # created and uploaded to, not committed
    assert sorted(hub.uploads()) == sorted(f"/lfs-upload/{sha}" for _, sha in ahead.values())
    assert sent["config.json"] is None  # a regular git file: a commit carries its bytes
    for path, _ in ahead.values():
        path.unlink()
    # as the upload step records them, and the publish step reads them back
    records = {name: PreuploadedFile.from_json(json.loads(json.dumps(sent[name].to_json()))) for name in ahead}
    assert {name: (r.sha256, r.size) for name, r in records.items()} == \
        {name: (sha, len(hub.lfs[sha])) for name, (_, sha) in ahead.items()}
    rest = {name: f for name, f in files.items() if name not in ahead}
    result = publisher(hub).publish("acme/m-GGUF", rest, private=True, message="m", preuploaded=records)
    assert len(repo.commits) == 1 and sorted(result.uploaded) == sorted(files) == sorted(repo.files)
    assert {name: repo.files[name]["lfs"] for name in ahead} == {name: sha for name, (_, sha) in ahead.items()}
    assert len(hub.uploads()) == 2  # nothing was sent twice
    # already on the Hub with that content: not sent again, and no commit for it
    again = publisher(hub).preupload("acme/m-GGUF", {"model-Q8_0.gguf": (repo_files()["model-Q8_0.gguf"])},
                                     private=True)
    assert again["model-Q8_0.gguf"] == records["model-Q8_0.gguf"] and len(hub.uploads()) == 2
    unchanged = publisher(hub).publish("acme/m-GGUF", {}, private=True, message="n", preuploaded=records)
    assert unchanged.commit is None and len(repo.commits) == 1


def test_a_commit_naming_an_upload_the_hub_no_longer_holds_is_a_clear_error(hub, repo_files):
    files = repo_files()
    ahead = {name: files[name] for name in ("model-Q4_K_M.gguf", "model-Q8_0.gguf")}
    sent = publisher(hub).preupload("acme/m-GGUF", ahead, private=False)
    del hub.lfs[ahead["model-Q8_0.gguf"][1]]  # uploads the Hub did not see committed in time expire
    expected = r"committing to acme/m-GGUF failed: HTTP 400.*: the Hub no longer holds model-Q8_0.gguf, uploaded ahead"
    with pytest.raises(PreuploadRejected, match=expected + r".*nothing was published") as info:
        publisher(hub).publish("acme/m-GGUF", {"README.md": files["README.md"]}, private=False, message="m",
                               preuploaded=sent)
    assert info.value.names == ["model-Q8_0.gguf"] and hub.repos["acme/m-GGUF"].commits == []


def test_recorded_files_are_compared_not_read_and_removed_types_are_deleted(hub, repo_files, tmp_path):
    from quantforge.publish.record import file_entries, known_blobs, removed_files

    first = repo_files(**{"params": b'{"temperature": 0.7}\n'})
    publisher(hub).publish("acme/m-GGUF", first, private=False, message="one")
    hub.seed("acme/m-GGUF", _folder(tmp_path / "by-hand", {"NOTES.md": b"a person's file\n"}), "by hand")
    previous = {"files": file_entries({k: v for k, v in first.items()}, {}, None)}
    # the next build made a new card and no longer declares Q4_K_M; Q8_0 and `params` were recorded, not built:
    # their bytes are not on this machine
    gone = tmp_path / "not-here"
    now = {"model-Q8_0.gguf": (gone / "model-Q8_0.gguf", first["model-Q8_0.gguf"][1]),
           "params": (gone / "params", first["params"][1]),
           **{k: v for k, v in repo_files(**{"README.md": b"# card v2\n"}).items()
              if k in ("README.md", "quantforge.json")}}
    entries = file_entries(now, {}, previous)
    assert entries["params"]["blob"] == previous["files"]["params"]["blob"]  # kept from the record
    removed = removed_files(previous, entries)
    assert removed == ["model-Q4_K_M.gguf"]
    result = publisher(hub).publish("acme/m-GGUF", now, private=False, message="two", delete=removed,
                                    blobs=known_blobs(entries))
    repo = hub.repos["acme/m-GGUF"]
    assert repo.commits[-1]["files"] == ["README.md"] and repo.commits[-1]["deleted"] == ["model-Q4_K_M.gguf"]
    assert sorted(repo.files) == ["NOTES.md", "README.md", "model-Q8_0.gguf", "params", "quantforge.json"]
    assert result.deleted == ["model-Q4_K_M.gguf"] and set(result.unchanged) >= {"model-Q8_0.gguf", "params"}
    # a recorded file whose copy on the Hub changed since cannot be restored from here: a clear error
    with pytest.raises(PublishError, match="params is not what its record says"):
        publisher(hub).publish("acme/m-GGUF", {**now, "params": (gone / "params", "0" * 64)}, private=False,
                               message="three", blobs={"params": "1" * 40})


def _folder(path, files: dict[str, bytes]):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


# ------------------------------------------------------------------------------------------------ Xet or LFS

@pytest.fixture
def hub_as_installed(monkeypatch):
    """huggingface_hub as a user's process has it: hf_xet importable, HF_HUB_DISABLE_XET unset when it was imported
    (so its constant is False, and it would upload through Xet)."""
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.delenv("QUANTFORGE_HUB_XET", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert is_xet_available()  # else this test would prove nothing
    with HubServer() as server:
        yield server


def test_uploads_take_the_lfs_path_unless_xet_is_asked_for(hub_as_installed, repo_files, monkeypatch):
    from huggingface_hub import constants

    hub = hub_as_installed
    result = publisher(hub).publish("acme/m-GGUF", repo_files(), private=False, message="one")
    assert result.commit and sorted(hub.uploads()) == sorted(
        f"/lfs-upload/{sha}" for name, (_, sha) in repo_files().items() if name.endswith(".gguf"))
    assert not [p for _, p, _ in hub.requests if "xet" in p]
    assert constants.HF_HUB_DISABLE_XET is False  # put back: other code in the process is left as it was

    monkeypatch.setenv("QUANTFORGE_HUB_XET", "1")  # the opt-in: huggingface_hub's own choice, Xet here
    with pytest.raises(PublishError, match="xet-write-token"):
        publisher(hub).publish("acme/m-GGUF", repo_files(**{"model-Q8_0.gguf": b"GGUF new"}), private=False,
                               message="two")
    assert any("/xet-write-token/" in p for _, p, _ in hub.requests)  # the loopback Hub speaks no Xet
    assert len(hub.repos["acme/m-GGUF"].commits) == 1


def test_doctor_says_which_protocol_uploads_use(monkeypatch):
    from quantforge.toolchains.hub_protocol import upload_protocol

    monkeypatch.delenv("QUANTFORGE_HUB_XET", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    assert upload_protocol().startswith("LFS (the protocol quantforge is tested with; QUANTFORGE_HUB_XET=1")
    monkeypatch.setenv("QUANTFORGE_HUB_XET", "1")
    assert upload_protocol() == "Xet (QUANTFORGE_HUB_XET=1; not covered by quantforge's tests)"
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    assert upload_protocol() == "LFS (QUANTFORGE_HUB_XET=1, but HF_HUB_DISABLE_XET is set)"
