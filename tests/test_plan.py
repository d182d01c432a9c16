from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from quantforge.console import reasons_text
from quantforge.core.staleness import stale_reasons
from quantforge.core.step import PlanContext, Step
from quantforge.errors import SourceError
from quantforge.pipeline import build_plan, load_targets
from quantforge.steps.source import resolve_hub_revision
from quantforge.store import WorkDir
from quantforge.toolchains import llamacpp

SHA1 = "1" * 40
SHA2 = "2" * 40

TARGETS = """
defaults:
  publish: {{to: "dir:./out"}}
models:
  - name: m
    source: org/m
    revision: '{rev}'
    formats:
      gguf: {{types: {types}, intermediate: {inter}}}
  - name: other
    source: org/other
    revision: '{sha1}'
    formats:
      gguf: {{types: [Q8_0]}}
"""


def plan_keys(write_targets, tmp_path, rev=SHA1, types="[Q4_K_M, Q8_0]", inter="auto", **ctx) -> dict[str, str]:
    path = write_targets(TARGETS.format(rev=rev, types=types, inter=inter, sha1=SHA1))
    context = PlanContext(work=WorkDir(tmp_path / "work"), offline=True, **ctx)
    return {s.label: s.key for s in build_plan(load_targets(path), context).steps}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {label for label in after if before.get(label) != after[label]}


def artifact_steps(t: str) -> list[str]:
    return [f"m/gguf/{t}:{k}" for k in ("quantize", "verify", "evaluate", "gate")]


M_EVAL = {"m:eval-tokens", "m:eval-reference"}
M_ALL = {"m:source", *M_EVAL, "m/gguf:convert", *artifact_steps("Q4_K_M"), *artifact_steps("Q8_0"),
         "m/gguf:publish"}


def test_plan_order_and_labels(write_targets, tmp_path):
    keys = plan_keys(write_targets, tmp_path)
    assert list(keys)[:13] == ["m:source", "m:eval-tokens", "m:eval-reference", "m/gguf:convert",
                               *artifact_steps("Q4_K_M"), *artifact_steps("Q8_0"), "m/gguf:publish"]


def cache_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """A snapshot laid out as huggingface_hub's cache keeps one: each file a link to a blob named by its id."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)


def test_a_source_is_keyed_by_the_files_a_build_reads_not_its_commit(write_targets, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    weights = {"config.json": b"{}", "model.safetensors": b"w1"}
    cache_snapshot(cache, "org/m", SHA1, {**weights, "README.md": b"# one"})
    cache_snapshot(cache, "org/m", SHA2, {**weights, "README.md": b"# two: only the card changed"})
    cache_snapshot(cache, "org/m", "3" * 40, {**weights, "model.safetensors": b"w2"})
    before = plan_keys(write_targets, tmp_path)
    assert changed(before, plan_keys(write_targets, tmp_path)) == set()  # deterministic
    assert changed(before, plan_keys(write_targets, tmp_path, rev=SHA2)) == set()  # a new commit, the same files
    assert changed(before, plan_keys(write_targets, tmp_path, rev="3" * 40)) == M_ALL  # new weights


def test_adding_a_type_adds_its_steps_and_republishes_only(write_targets, tmp_path):
    before = plan_keys(write_targets, tmp_path)
    after = plan_keys(write_targets, tmp_path, types="[Q4_K_M, Q8_0, Q6_K]")
    assert changed(before, after) == {*artifact_steps("Q6_K"), "m/gguf:publish"}


def test_intermediate_type_changes_convert_and_everything_after_it(write_targets, tmp_path):
    before = plan_keys(write_targets, tmp_path)
    assert changed(before, plan_keys(write_targets, tmp_path, inter="bf16")) == M_ALL - {"m:source", *M_EVAL}


def test_libllama_version_makes_quantize_and_verify_stale_not_convert(write_targets, tmp_path, monkeypatch):
    checkout = tmp_path / "llama.cpp"
    checkout.mkdir()
    (checkout / "convert_hf_to_gguf.py").write_text("# a user's converter\n")
    before = plan_keys(write_targets, tmp_path, llama_cpp_dir=str(checkout))
    monkeypatch.setattr(llamacpp, "llama_cpp_version", lambda: "9.9.9")
    after = plan_keys(write_targets, tmp_path, llama_cpp_dir=str(checkout))
    stale = changed(before, after)
    assert not stale & {"m/gguf:convert", "m:source", *M_EVAL}
    assert {"m/gguf/Q4_K_M:quantize", "m/gguf/Q8_0:verify", "m/gguf:publish", "other/gguf/Q8_0:quantize"} <= stale


def test_converter_version_makes_convert_and_everything_after_it_stale(write_targets, tmp_path):
    checkout = tmp_path / "llama.cpp"
    checkout.mkdir()
    (checkout / "convert_hf_to_gguf.py").write_text("# v1\n")
    before = plan_keys(write_targets, tmp_path, llama_cpp_dir=str(checkout))
    (checkout / "convert_hf_to_gguf.py").write_text("# v2\n")
    after = plan_keys(write_targets, tmp_path, llama_cpp_dir=str(checkout))
    assert {s for s in changed(before, after) if s.startswith("m")} == M_ALL - {"m:source", *M_EVAL}


def test_gate_change_reruns_only_gates_and_publish(write_targets, tmp_path):
    def keys(gate: str = "", enforce: bool = True) -> dict[str, str]:
        path = write_targets(f"""
            models:
              - name: m
                source: org/m
                revision: '{SHA1}'
                formats: {{gguf: {{types: [Q8_0]}}}}
                publish: {{to: 'dir:./out'}}
                evaluation: {{max_ppl_increase: {{{gate}}}}}
            """)
        context = PlanContext(work=WorkDir(tmp_path / "work"), offline=True, enforce_gates=enforce)
        return {s.label: s.key for s in build_plan(load_targets(path), context).steps}

    before = keys()
    assert changed(before, keys(enforce=False)) == {"m/gguf/Q8_0:gate", "m/gguf:publish"}
    assert changed(before, keys(gate="gguf/q8_0: 0.5")) == {"m/gguf/Q8_0:gate", "m/gguf:publish"}
    assert changed(before, keys(gate="gguf: 0.5")) == {"m/gguf/Q8_0:gate", "m/gguf:publish"}
    assert changed(before, keys(gate="gguf/Q4_K_M: 0.5")) == set()  # another type's gate


def test_local_source_digest_follows_file_contents(write_targets, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights-1")
    (src / "tokenizer.json").write_text("{}")
    path = write_targets('models:\n  - {name: l, source: ./ckpt, formats: {gguf: {}}}\n')

    def source_key() -> str:
        return build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "work"))).steps[0].key

    k1 = source_key()
    assert source_key() == k1
    (src / "model.safetensors").write_bytes(b"weights-2")
    assert source_key() != k1


def test_golden_step_key():
    """Changing how keys are computed silently rebuilds every user's cache: make it a deliberate change."""
    step = Step("gguf.quantize", "m/gguf/Q8_0:quantize", {"type": "Q8_0", "file": "m-Q8_0.gguf"},
                tools={"libllama": "0.3.36"})
    # gguf.quantize version 2: it writes provenance keys into the file (formats/gguf_release.py)
    assert step.key == "b17a1ff41233a23fcec4ed15877d3e57ca55d5334af14f12e0d0ccac160a6a19"


def test_stale_reasons_name_what_changed(tmp_path):
    work = WorkDir(tmp_path / "work")
    old = Step("gguf.quantize", "m/gguf/Q8_0:quantize", {"type": "Q8_0"}, tools={"libllama": "0.3.36"})
    assert reasons_text(stale_reasons(old, work)) == "never built"
    work.record_state(old.label, {**old.fingerprint(), "key": old.key})
    assert reasons_text(stale_reasons(old, work)) == "output missing from the work dir"
    new = Step("gguf.quantize", "m/gguf/Q8_0:quantize", {"type": "Q8_0"}, tools={"libllama": "0.3.37"})
    assert reasons_text(stale_reasons(new, work)) == "tools.libllama: 0.3.36 -> 0.3.37"


# ------------------------------------------------------------------ Hub revision resolution, on loopback

REFS = {("org/m", "main"): SHA1, ("org/m", "v2"): SHA2}


class _Hub(BaseHTTPRequestHandler):

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        # /api/models/{org}/{name}/revision/{rev}
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            repo, rev = f"{parts[2]}/{parts[3]}", parts[5]
            if not any(r == repo for r, _ in REFS):
                return self._error(404, "RepoNotFound")
            sha = REFS.get((repo, rev))
            if sha is None:
                return self._error(404, "RevisionNotFound")
            body = json.dumps({"id": repo, "sha": sha, "siblings": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None
        return self._error(404, "EntryNotFound")

    def _error(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield
    server.shutdown()


def test_hub_branch_and_tag_resolve_to_commit(hub):
    assert resolve_hub_revision("org/m", "main") == SHA1
    assert resolve_hub_revision("org/m", "v2") == SHA2


@pytest.mark.parametrize(("repo", "rev", "message"), [("org/nope", "main", "no such model repo"),
                                                      ("org/m", "v9", "no revision 'v9'")])
def test_hub_resolution_errors_are_clear(hub, repo, rev, message):
    with pytest.raises(SourceError, match=message):
        resolve_hub_revision(repo, rev)


def test_offline_resolution_uses_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--m" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA2)
    assert resolve_hub_revision("org/m", "main", offline=True) == SHA2
    assert resolve_hub_revision("org/m", SHA1, offline=True) == SHA1
    with pytest.raises(SourceError, match="offline"):
        resolve_hub_revision("org/m", "dev", offline=True)


CALIBRATED = """
defaults:
  publish: {{to: "dir:./out"}}
  calibration: {{samples: {samples}, seq_len: 256}}
models:
  - name: m
    source: org/m
    revision: '{sha1}'
    formats:
      gguf: {{types: {types}, imatrix: true}}
      gptq: {{bits: 4, group_size: 64}}
      awq: {{group_size: 64, samples: 16}}
"""


def calibrated_plan(write_targets, tmp_path, samples=32, types="[Q4_K_M]"):
    path = write_targets(CALIBRATED.format(samples=samples, types=types, sha1=SHA1))
    return build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "work"), offline=True))


def test_calibration_is_shared_and_the_imatrix_serves_every_type(write_targets, tmp_path):
    plan = calibrated_plan(write_targets, tmp_path, types="[Q4_K_M, Q5_K_M, Q8_0, F16]")
    steps = {s.label: s for s in plan.steps}
    imatrix = steps["m/gguf:imatrix"]
    # the imatrix and GPTQ ask for the model's calibration text; AWQ asks for its own sample count
    assert imatrix.inputs["calibration"] is steps["m/gptq:quantize"].inputs["calibration"] is steps["m:calibration"]
    assert steps["m/awq:quantize"].inputs["calibration"] is steps["m:calibration-16x256"]
    assert steps["m:calibration-16x256"].params["samples"] == 16
    for t in ("Q4_K_M", "Q5_K_M"):
        assert steps[f"m/gguf/{t}:quantize"].inputs["imatrix"] is imatrix
    for t in ("Q8_0", "F16"):  # llama.cpp's Q8_0 and F16 take no matrix: their keys must not depend on one
        assert "imatrix" not in steps[f"m/gguf/{t}:quantize"].inputs
    assert [s.label for s in plan.steps].index("m:calibration") < [s.label for s in plan.steps].index(
        "m/gguf:imatrix")


def test_imatrix_key_follows_source_and_calibration_not_types(write_targets, tmp_path):
    before = {s.label: s.key for s in calibrated_plan(write_targets, tmp_path).steps}
    more_types = {s.label: s.key for s in calibrated_plan(write_targets, tmp_path, types="[Q4_K_M, Q6_K]").steps}
    assert "m/gguf:imatrix" not in changed(before, more_types)
    fewer_samples = changed(before, {s.label: s.key for s in calibrated_plan(write_targets, tmp_path, 64).steps})
    assert {"m:calibration", "m/gguf:imatrix", "m/gguf/Q4_K_M:quantize", "m/gptq:quantize"} <= fewer_samples
    assert not fewer_samples & {"m/gguf:convert", "m/awq:quantize", "m:eval-reference"}
