"""Command-line flags and environment switches that no other test takes, each checked by what it changes:
--dry-run, --ignore-published, a token from `hf auth login` instead of HF_TOKEN, `doctor` on this machine,
--no-gate, --threads, --llama-cpp, --no-memory-check, QUANTFORGE_EVICT, and the converter's "unsupported
architecture" refusal."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from hub_server import HubServer
from tiny_models import fake_checkpoint

REPO = Path(__file__).resolve().parents[1]
FILE_TOKEN = "hf_fromTheLoginFile42"


def quantforge(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


# ------------------------------------------------------------------------------ --dry-run, --ignore-published

def test_dry_run_runs_nothing_and_ignore_published_judges_by_the_work_dir_alone(tmp_path):
    fake_checkpoint(tmp_path / "ckpt")
    (tmp_path / "targets.yaml").write_text("defaults:\n  publish: {to: 'dir:./out', namespace: t}\n"
                                           "models:\n  - {name: m, source: ./ckpt, formats: {gguf: {types: [Q8_0]}}}\n")

    def run(*args: str) -> dict:
        proc = quantforge(*args, "--json", "--work-dir", "work", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def statuses(report: dict) -> dict[str, str]:
        return {s["label"]: s["status"] for s in report["steps"]}

    planned = run("plan", "targets.yaml")["steps"]
    assert len(planned) == 9 and {s["status"] for s in planned} == {"stale"}
    dry = run("build", "targets.yaml", "--dry-run")
    assert set(statuses(dry).values()) == {"would-build"} and len(dry["steps"]) == 9
    assert not (tmp_path / "work" / "steps").exists() and not (tmp_path / "out").exists()  # nothing ran

    # published by these very steps, elsewhere: the repo's record (made from plan --json, as a publish writes it)
    repo = tmp_path / "out" / "t" / "m-GGUF"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("# card\n")
    keys = {s["label"]: s["key"] for s in planned}
    (repo / "quantforge.json").write_text(json.dumps({"build": {
        "key": keys["m/gguf:publish"], "steps": keys, "card_sha256": hashlib.sha256(b"# card\n").hexdigest()}}))
    assert {s["status"] for s in run("plan", "targets.yaml")["steps"]} == {"up-to-date"}
    by_record = statuses(run("build", "targets.yaml", "--dry-run"))
    assert by_record["m/gguf:publish"] == "up-to-date" and set(by_record.values()) <= {"up-to-date", "not-needed"}
    # --ignore-published: the record is not read, so a fresh work dir has everything to do
    ignoring = run("plan", "targets.yaml", "--ignore-published")["steps"]
    assert {s["status"] for s in ignoring} == {"stale"}
    assert {r["what"] for s in ignoring for r in s["reasons"]} == {"never-built"}
    assert set(statuses(run("build", "targets.yaml", "--dry-run", "--ignore-published")).values()) == {"would-build"}
    assert not (tmp_path / "work" / "steps").exists()


# ------------------------------------------------------------------------------------------ token from a file

def test_a_token_from_hf_auth_login_is_used_where_hf_token_is_not_set(tmp_path):
    """`hf auth login` (huggingface_hub's own CLI) writes the token to $HF_HOME/token; with no HF_TOKEN, a plan reads
    a private Hub source and a publish writes a repo with it, on a loopback Hub that refuses any other token."""
    fake_checkpoint(tmp_path / "ckpt")
    with HubServer(accept_token=FILE_TOKEN) as hub:
        hub.seed("org/private-src", tmp_path / "ckpt")
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
        env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url)
        login = subprocess.run([str(Path(sys.executable).parent / "hf"), "auth", "login", "--token", FILE_TOKEN],
                               capture_output=True, text=True, env=env)
        assert login.returncode == 0, login.stderr
        assert (tmp_path / "hf" / "token").read_text().strip() == FILE_TOKEN

        (tmp_path / "targets.yaml").write_text(
            "defaults:\n  publish: {to: hub, namespace: t}\n"
            "models:\n  - {name: m, source: org/private-src, formats: {gguf: {types: [Q8_0]}}}\n")
        plan = quantforge("plan", "targets.yaml", "--json", "--work-dir", "work", cwd=tmp_path, env=env)
        assert plan.returncode == 0, plan.stderr
        source = next(s for s in json.loads(plan.stdout)["steps"] if s["kind"] == "source")
        assert source["label"] == "m:source"

        (tmp_path / "file.gguf").write_bytes(b"GGUF" + bytes(5000))
        publish = ("import sys; from pathlib import Path; from quantforge.publish import publisher_for; "
                   "from quantforge.store import sha256_file; p = Path(sys.argv[1]); "
                   "print(publisher_for('hub').publish('t/m-GGUF', {'m.gguf': (p, sha256_file(p))}, private=False, "
                   "message='m').commit)")
        proc = subprocess.run([sys.executable, "-c", publish, str(tmp_path / "file.gguf")], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == hub.repos["t/m-GGUF"].commits[0]["oid"]
        sent = {auth for method, path, auth in hub.requests
                if path != "/api/agent-harnesses" and not path.startswith("/lfs-upload/")}
        assert sent == {f"Bearer {FILE_TOKEN}"}  # every Hub request carried the file's token, and only it
        assert FILE_TOKEN not in plan.stdout + plan.stderr + proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ doctor

def test_doctor_on_this_machine():
    proc = quantforge("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout)
    assert info["python"] == platform.python_version() and info["problems"] == "none"
    for package in ("llama-cpp-python", "torch", "transformers", "huggingface_hub", "hf_xet", "gguf"):
        assert info[package] == metadata.version(package), package
    assert info["converter"] == f"llama-cpp-python=={metadata.version('llama-cpp-python')}"
    assert info["llama.cpp system"].startswith("CPU : ")
    assert re.fullmatch(r"\d+\.\d\d GB RAM, \d+\.\d\d GB available( \(cgroup limit .*\))?", info["memory"])
    import torch

    if not torch.cuda.is_available():
        assert info["gpu"].startswith("none: every step runs on the CPU")
    assert info["hub uploads"].startswith("LFS (the protocol quantforge is tested with")
    text = quantforge("doctor")
    assert text.returncode == 0 and re.search(r"^hub uploads +LFS \(", text.stdout, re.M)


# ------------------------------------------------------------------------------------------------ builds

TINY = """
defaults:
  publish: {{to: 'dir:./out', namespace: t}}
  formats: {{gguf: {{types: [Q8_0]}}}}
  evaluation: {{ctx: 64, chunks: 2, max_ppl_increase: {{gguf: 10}}, tokenizer_check: {check}}}
models:
  - {{name: m, source: {source}}}
"""


@pytest.mark.slow
def test_threads_a_llama_cpp_folder_no_memory_check_and_evict_from_the_environment(tmp_path, tiny_models, converter,
                                                                                  monkeypatch):
    from typer.testing import CliRunner

    from quantforge import cli
    from quantforge.steps import memory
    from quantforge.toolchains.memory import HostMemory

    checkout = tmp_path / "my-llama.cpp"  # a copy of the converter, not a git checkout: known by its files
    shutil.copytree(converter.root, checkout)
    (tmp_path / "targets.yaml").write_text(TINY.format(source=tiny_models("llama"), check="false"))
    monkeypatch.setattr(memory, "host_memory", lambda: HostMemory(8 * 10**9, 200 * 10**6, None))  # too little
    args = ["build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"), "--threads", "1",
            "--llama-cpp", str(checkout)]
    refused = CliRunner().invoke(cli.app, args)
    assert refused.exit_code == 1 and "refusing to start" in refused.output and "200 MB available" in refused.output
    monkeypatch.setenv("QUANTFORGE_EVICT", "1")
    result = CliRunner().invoke(cli.app, [*args, "--no-memory-check", "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    steps = {s["label"]: s for s in json.loads(result.stdout)["steps"]}
    # --llama-cpp: that folder's converter ran, and is named by its files' content in the key and the record
    convert = steps["m/gguf:convert"]
    assert re.fullmatch(r"checkout:files-[0-9a-f]{16}", convert["data"]["converter"])
    assert f"{checkout}/convert_hf_to_gguf.py " in Path(convert["log"]).read_text()
    # --threads: llama.cpp's contexts ran on one thread, one token at a time and in batches
    assert steps["m/gguf/Q8_0:verify"]["data"]["threads"] == [1, 1]
    assert steps["m/gguf/Q8_0:evaluate"]["data"]["threads"] == [1, 1]
    # QUANTFORGE_EVICT=1: the intermediate and the published artifact are gone from the work dir, their records kept
    work = tmp_path / "work" / "steps"
    assert not list(work.glob("gguf.convert/*/intermediate.gguf")) and not list(work.glob("gguf.quantize/*/*.gguf"))
    assert (tmp_path / "out" / "t" / "m-GGUF" / "m-Q8_0.gguf").is_file()


@pytest.mark.slow
def test_no_gate_publishes_what_misses_its_gate_and_records_it(tmp_path, tiny_models):
    # the tiny Mistral's GGUF tokenizes "café" otherwise than its HF tokenizer (tests/test_gguf.py): a gate it misses
    (tmp_path / "targets.yaml").write_text(TINY.format(source=tiny_models("mistral"), check="true"))
    build = ["build", "targets.yaml", "--work-dir", "work"]
    gated = quantforge(*build, cwd=tmp_path)
    assert gated.returncode == 1 and "gate gguf/Q8_0 failed: tokenizer differs from the source's" in gated.stderr
    assert not (tmp_path / "out").exists()
    ungated = quantforge(*build, "--no-gate", cwd=tmp_path)
    assert ungated.returncode == 0, ungated.stderr[-2000:]
    assert "not enforced (would fail)" in ungated.stderr and "published t/m-GGUF" in ungated.stderr
    repo = tmp_path / "out" / "t" / "m-GGUF"
    assert (repo / "m-Q8_0.gguf").is_file()
    gate = json.loads((repo / "quantforge.json").read_text())["artifacts"]["Q8_0"]["check"]["gate"]
    assert gate["enforced"] is False and gate["passed"] is False
    assert [p.split(":")[0] for p in gate["problems"]] == ["tokenizer differs from the source's"]
    report = json.loads((tmp_path / "work" / "reports" / "latest.json").read_text())
    ran = {s["label"] for s in report["steps"] if s["status"] == "built"}
    assert ran == {"m/gguf/Q8_0:gate", "m/gguf:publish"}  # the measurement was reused, only the gate moved


@pytest.mark.slow
def test_an_architecture_the_converter_does_not_know_is_one_line(tmp_path, converter, tiny_models):
    from quantforge.errors import ConversionError
    from quantforge.toolchains.llamacpp import convert

    source = tmp_path / "odd"
    shutil.copytree(tiny_models("llama"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ConversionError) as info:
        convert(converter, source, tmp_path / "out.gguf", "f16", tmp_path / "convert.log", "odd")
    assert str(info.value) == "odd: llama.cpp's converter does not support architecture NoSuchForCausalLM"
    assert info.value.hint == "a newer llama.cpp may (--llama-cpp DIR pointing at a recent checkout)"
    assert not (tmp_path / "out.gguf").exists()
