"""`--json` is always JSON: every exit of eval, plan, build and push prints one JSON document on stdout, with `ok`,
the error (kind, message, hint) and, per artifact, what became of it; and hostile files give one clear error."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer
from tiny_models import fake_checkpoint

from quantforge.report import artifact_statuses, first_error
from quantforge.toolchains.gguf_header import CorruptGGUF, read_header


def quantforge(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
               ) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run the CLI; its stdout parsed as one JSON document (a test failure when it is not)."""
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})
    try:
        document = json.loads(proc.stdout, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))
    except ValueError:
        pytest.fail(f"stdout is not one JSON document (exit {proc.returncode}): {proc.stdout!r}\n{proc.stderr}")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, document


def _gguf(*fields: bytes) -> bytes:
    return b"GGUF" + struct.pack("<I", 3) + b"".join(fields)


def Q(n: int) -> bytes:  # the struct codes they pack
    return struct.pack("<Q", n)


def I(n: int) -> bytes:  # noqa: E743
    return struct.pack("<I", n)


def _string(text: str) -> bytes:
    return Q(len(text)) + text.encode()


# ------------------------------------------------------------------------------------------------ the header reader

CORRUPT_HEADERS = [  # (header bytes, where it is refused, what the message says)
    (_gguf(Q(0), Q(1), Q(2**60), b"x" * 16), 24, "a string of 1152921504606846976 bytes"),
    (_gguf(Q(0), Q(1), _string("k"), I(9), I(4), Q(2**60)), 37, "an array of 1152921504606846976 elements"),
    (_gguf(Q(0), Q(1), _string("k"), I(9), I(12), Q(40), bytes(100)), 37, "an array of 320 bytes"),  # 40 doubles
    (_gguf(Q(0), Q(1), _string("k"), I(9), I(8), Q(2), Q(2**50)), 49, "a string of 1125899906842624 bytes"),
    (_gguf(Q(0), Q(1), _string("k"), I(77)), 33, "unknown value type 77"),
    (_gguf(Q(0), Q(2**62)), 24, "the file ends inside the header"),  # a count no file could hold
    (_gguf(Q(1), Q(0), _string("t"), I(2**31)), 33, "has 2147483648 dimensions"),
    (_gguf(Q(0), Q(1), _string("general.alignment"), I(4), I(0)), 0, "general.alignment is 0"),
    (_gguf(Q(0))[:-3], 8, "the file ends inside the header"),
]


@pytest.mark.parametrize(("header", "offset", "what"), CORRUPT_HEADERS)
def test_a_header_that_lies_about_its_lengths_is_refused_where_it_lies(tmp_path, header, offset, what):
    path = tmp_path / "bad.gguf"
    path.write_bytes(header)
    with pytest.raises(CorruptGGUF) as info:
        read_header(path)
    assert f"corrupt GGUF header at offset {offset}: " in str(info.value) and what in str(info.value), info.value


def test_a_file_cut_inside_its_tensor_data_is_refused_as_truncated(tmp_path):
    # one F32 tensor of 8 elements at offset 0: its 32 bytes must follow the header (data aligned to 32)
    header = _gguf(Q(1), Q(0), _string("w"), I(1), Q(8), I(0), Q(0))
    start = -(-len(header) // 32) * 32
    whole = header + bytes(start - len(header)) + bytes(32)
    (tmp_path / "whole.gguf").write_bytes(whole)
    assert read_header(tmp_path / "whole.gguf").tensors[0].n_elements == 8
    (tmp_path / "cut.gguf").write_bytes(whole[:-1])
    with pytest.raises(CorruptGGUF, match=rf"cut.gguf: truncated GGUF: tensor 'w' ends at byte {start + 32}, past "
                                          rf"the end of the file \({start + 31} bytes\)"):
        read_header(tmp_path / "cut.gguf")


# ------------------------------------------------------------------------------------------------ eval

def _hostile(tmp_path: Path, kind: str) -> Path:
    """A path `quantforge eval` is given that is not an artifact it can measure."""
    match kind:
        case "a directory named x.gguf":
            (tmp_path / "x.gguf").mkdir()
            return tmp_path / "x.gguf"
        case "an empty directory":
            (tmp_path / "empty").mkdir()
            return tmp_path / "empty"
        case "random safetensors":
            (tmp_path / "model.safetensors").write_bytes(os.urandom(4096))
            return tmp_path / "model.safetensors"
        case "a folder of random safetensors":
            (tmp_path / "ckpt").mkdir()
            (tmp_path / "ckpt" / "model.safetensors").write_bytes(os.urandom(4096))
            return tmp_path / "ckpt"
        case "a symlink to /dev/zero":
            (tmp_path / "zero.gguf").symlink_to("/dev/zero")
            return tmp_path / "zero.gguf"
        case "a missing path":
            return tmp_path / "nope.gguf"
        case "a 2^60-byte string in the header":
            (tmp_path / "huge.gguf").write_bytes(CORRUPT_HEADERS[0][0])
            return tmp_path / "huge.gguf"
        case "a header that ends early":
            (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")
            return tmp_path / "short.gguf"
        case "a GGUF with a bad magic":
            (tmp_path / "magic.gguf").write_bytes(b"GGML" + bytes(64))
            return tmp_path / "magic.gguf"
        case "a config.json that is not a checkpoint's":
            (tmp_path / "notq").mkdir()
            (tmp_path / "notq" / "config.json").write_text('{"quantization_config": {"quant_method": "fp8"}}')
            return tmp_path / "notq"
    raise AssertionError(kind)


HOSTILE = ["a directory named x.gguf", "an empty directory", "random safetensors", "a folder of random safetensors",
           "a symlink to /dev/zero", "a missing path", "a 2^60-byte string in the header", "a header that ends early",
           "a GGUF with a bad magic", "a config.json that is not a checkpoint's"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_eval_of_a_hostile_path_prints_one_json_error(tmp_path, kind):
    path = _hostile(tmp_path, kind)
    source = fake_checkpoint(tmp_path / "source")
    proc, document = quantforge("eval", str(path), "--source", str(source), "--work-dir", str(tmp_path / "w"),
                                "--json", "--offline")
    assert proc.returncode == 2, proc.stderr
    error = document["error"]
    assert document["ok"] is False and document["status"] == "failed" and document["artifact"] == str(path)
    assert error["kind"] == "BadInputError" and error["message"] and error["exit_code"] == 2
    assert path.name in error["message"]
    assert f"error: {error['message']}" in proc.stderr  # the same line a person reads without --json
    if "2^60" in kind:
        assert "corrupt GGUF header at offset 24" in error["message"]


# ------------------------------------------------------------------------------------------------ plan, build

TARGETS = """
defaults:
  publish: {to: "dir:./out", namespace: t}
models:
  - {name: m, source: org/src, formats: {gguf: {types: [Q8_0]}}}
"""


@pytest.mark.parametrize("hub_fault", ["401", "500"])
@pytest.mark.parametrize("command", ["plan", "build"])
def test_plan_and_build_print_json_when_the_hub_refuses_at_plan_time(tmp_path, command, hub_fault):
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    with HubServer(accept_token="the-right-one") as hub:
        token = "a-wrong-one" if hub_fault == "401" else "the-right-one"
        if hub_fault == "500":
            hub.fail("GET", "/api/models/org/src", 500, times=100)
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
        proc, document = quantforge(command, str(targets), "--work-dir", str(tmp_path / "w"), "--json", env=env)
    assert proc.returncode == 2 and document["ok"] is False and document["steps"] == []
    assert document["error"]["kind"] == "SourceError"
    expected = "refused the token (HTTP 401)" if hub_fault == "401" else "500"
    assert expected in document["error"]["message"] and token not in proc.stdout + proc.stderr
    if command == "build":
        assert document["artifacts"] == []


@pytest.mark.parametrize("command", ["plan", "build", "push"])
def test_an_invalid_targets_file_is_json_with_every_issue(tmp_path, command):
    targets = tmp_path / "targets.yaml"
    targets.write_text("models:\n  - {name: m, source: ./nowhere, formats: {gguf: {typs: [Q8_0]}}}\n")
    proc, document = quantforge(command, str(targets), "--work-dir", str(tmp_path / "w"), "--json")
    assert proc.returncode == 2 and document["error"]["kind"] == "ConfigError"
    assert document["error"]["issues"] == [f"{targets}:2: models[0].formats.gguf.typs: unknown key 'typs'; did you "
                                           "mean 'types'?"]
    missing, document = quantforge(command, str(tmp_path / "absent.yaml"), "--json")
    assert missing.returncode == 2 and document["ok"] is False and "absent.yaml" in document["error"]["message"]


def test_plan_json_says_ok(tmp_path):
    fake_checkpoint(tmp_path / "ckpt")
    targets = tmp_path / "targets.yaml"
    targets.write_text("models:\n  - {name: m, source: ./ckpt, formats: {gguf: {types: [Q8_0]}}}\n")
    proc, document = quantforge("plan", str(targets), "--work-dir", str(tmp_path / "w"), "--json")
    assert proc.returncode == 0 and document["ok"] is True and document["warnings"] == []
    assert {s["status"] for s in document["steps"]} == {"stale"}


# ------------------------------------------------------------------------------------------------ artifact status

def _step(label: str, stage: str, status: str, **extra) -> dict:
    model, _, rest = label.partition("/")
    fmt, _, qtype = rest.partition("/")
    return {"label": label, "stage": stage, "status": status, "model": model, "format": fmt or None,
            "type": qtype.split(":")[0] or None, **extra}


def _artifact(qtype: str, *statuses: str, **extra) -> list[dict]:
    return [_step(f"m/gguf/{qtype}:{stage}", stage, status, **(extra if status == "failed" else {}))
            for stage, status in zip(("artifact", "verify", "evaluate", "gate"), statuses, strict=True)]


def test_each_artifact_says_whether_it_passed_failed_at_its_gate_or_failed_before_it():
    source_failed = _step("m:source", "", "failed", error="download failed", error_kind="SourceError",
                          log="logs/m_source.log")
    report = {"steps": [
        _step("m:eval-reference", "", "built"),
        *_artifact("Q8_0", "built", "built", "built", "built"),
        *_artifact("Q4_0", "built", "built", "built", "failed", error="gate gguf/Q4_0 failed: ΔPPL +30%",
                   error_kind="GateFailed"),
        *_artifact("Q2_K", "built", "failed", "skipped", "skipped", error="llama.cpp generated no token",
                   error_kind="VerificationError", hint="look at the log"),
        *_artifact("Q6_K", "not-needed", "not-needed", "not-needed", "not-needed"),
        *_artifact("Q5_0", "would-build", "would-build", "would-build", "would-build"),
    ]}
    skipped = [s | {"reasons": [{"what": "input-failed", "new": ["m:source"]}]}
               for s in _artifact("Q3_K_M", "skipped", "skipped", "skipped", "skipped")]
    stopped = [s | {"reasons": [{"what": "stopped"}]} for s in _artifact("IQ4_XS", "not-run", "not-run", "not-run",
                                                                           "not-run")]
    report["steps"] = [source_failed, *report["steps"], *skipped, *stopped]
    statuses = {a["type"]: a for a in artifact_statuses(report)}
    assert statuses["Q8_0"]["status"] == "passed"
    assert statuses["Q4_0"] == {"artifact": "m/gguf/Q4_0", "model": "m", "format": "gguf", "type": "Q4_0",
                                "status": "failed-gate", "step": "m/gguf/Q4_0:gate", "kind": "GateFailed",
                                "reason": "gate gguf/Q4_0 failed: ΔPPL +30%"}
    assert {k: statuses["Q2_K"][k] for k in ("status", "step", "reason", "hint")} == {
        "status": "failed", "step": "m/gguf/Q2_K:verify", "reason": "llama.cpp generated no token",
        "hint": "look at the log"}
    # its own steps were skipped: the failure upstream (a step all artifacts need) is the reason
    assert {k: statuses["Q3_K_M"][k] for k in ("status", "step", "reason", "log")} == {
        "status": "failed", "step": "m:source", "reason": "download failed", "log": "logs/m_source.log"}
    assert statuses["IQ4_XS"]["status"] == "not-run" and statuses["IQ4_XS"]["after"]["step"] == "m:source"
    assert statuses["Q6_K"]["status"] == "up-to-date" and statuses["Q5_0"]["status"] == "would-build"
    assert first_error(report) == {"kind": "SourceError", "message": "download failed", "step": "m:source",
                                   "log": "logs/m_source.log"}


@pytest.mark.slow
def test_eval_of_an_artifact_that_fails_before_its_gate_says_which_step_and_why(tmp_path, tiny_models):
    """A GGUF whose header holds together but that llama.cpp cannot load: measured never, gated never."""
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(_gguf(Q(0), Q(1), _string("general.architecture"), I(8), _string("llama")))
    proc, document = quantforge("eval", str(empty), "--source", str(tiny_models("llama")), "--ctx", "64", "--chunks",
                                "2", "--work-dir", str(tmp_path / "w"), "--json")
    assert proc.returncode == 1 and document["ok"] is False
    assert document["status"] == "failed" and document["step"] == "empty.gguf:evaluate"
    assert document["gate"] is None  # never reached, not "pass"
    assert document["error"]["kind"] == "VerificationError" and "empty.gguf" in document["reason"]


@pytest.mark.parametrize(("args", "says"), [
    (["plan", "t.yaml", "--work-dir", "a-file"], "is a file, not a folder"),
    (["build", "t.yaml", "--work-dir", "a-file"], "is a file, not a folder"),
    (["build", "t.yaml", "--only", "nobody"], "no model 'nobody'"),
    (["push", "t.yaml", "--to", "ftp:x"], "--to ftp:x: expected hub, or dir:PATH"),
    (["plan", "/dev/zero"], "larger than 256 KB"),
    (["eval", "x.gguf", "--source", "ck", "--ctx", "3"], "--ctx: Input should be greater than or equal to 16"),
    (["eval", "x.gguf", "--source", "ck", "--max-kld", "inf"], "--max-kld: must be >= 0 and finite"),
])
def test_user_mistakes_are_one_json_error_each(tmp_path, args, says):
    fake_checkpoint(tmp_path / "ck")
    (tmp_path / "t.yaml").write_text("models:\n  - {name: m, source: ./ck, formats: {gguf: {types: [Q8_0]}}}\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    proc, document = quantforge(*args, "--json", cwd=tmp_path)
    assert proc.returncode == 2 and document["ok"] is False and says in document["error"]["message"], proc.stderr
