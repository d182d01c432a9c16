"""Bad input, broken artifacts and hostile conditions: each gives a clear error and loses nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from disks import fill, small_disk

from quantforge.core.step import Step, StepContext, StepOutput
from quantforge.errors import DiskFull, GateFailed
from quantforge.publish.localdir import LocalDirPublisher
from quantforge.steps.gate import gate_step, run_gate
from quantforge.store import WorkDir, sha256_file, write_json_atomic


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, cwd=cwd)


def strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------ NaN gates

def _run_gate(tmp_path: Path, evaluation: dict, **limits):
    from quantforge.config.schema import EvaluationSettings

    settings = EvaluationSettings(**limits)
    ev, check = Step("gguf.evaluate", "e", {}), Step("gguf.verify", "v", {})
    step = gate_step("m/gguf/Q4_K_M:gate", "gguf", "Q4_K_M", ev, check, settings, None, True, "m")
    ctx = StepContext(step, tmp_path, tmp_path / "log", {"evaluation": StepOutput(tmp_path, {"data": evaluation}),
                                                         "check": StepOutput(tmp_path, {"data": {}})}, None)
    return run_gate(step, ctx)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_non_finite_measurement_fails_the_gate_whatever_the_limits(tmp_path, bad):
    measured = {"ppl": bad, "ppl_err": bad, "source_ppl": 10.0, "delta_ppl": bad, "kld_mean": bad, "top1": 0.1}
    with pytest.raises(GateFailed, match="not a finite number"):
        _run_gate(tmp_path, measured)  # no max_ppl_increase, no max_kld: still refused


@pytest.mark.slow
def test_a_gguf_with_random_tensor_data_fails_quantforge_eval_with_valid_json(tmp_path, tiny_models, converter):
    from quantforge.toolchains import llamacpp
    from quantforge.toolchains.gguf_header import read_header

    source = tiny_models("llama")
    gguf = tmp_path / "random.gguf"
    llamacpp.convert(converter, source, gguf, "f16", tmp_path / "convert.log", "tiny")
    header = read_header(gguf)
    data_start = header.data_start
    rng = np.random.default_rng(0)
    with open(gguf, "r+b") as f:  # a valid header over random weights: NaN and inf logits
        f.seek(data_start)
        f.write(rng.integers(0, 256, gguf.stat().st_size - data_start, dtype=np.uint8).tobytes())
    proc = cli("eval", str(gguf), "--source", str(source), "--ctx", "64", "--chunks", "2", "--json",
               "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 1, proc.stderr
    out = strict_json(proc.stdout)  # no NaN in the output
    assert out["ok"] is False and "not a finite number" in out["gate"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_quantforge_eval_keys_a_file_by_its_content_not_where_it_is(tmp_path, tiny_models, converter):
    """No absolute path in an ad-hoc evaluation's keys: the same GGUF moved elsewhere reuses its evaluation."""
    from quantforge.toolchains import llamacpp

    source = tiny_models("llama")
    first = tmp_path / "a" / "tiny.gguf"
    first.parent.mkdir()
    llamacpp.convert(converter, source, first, "f16", tmp_path / "convert.log", "tiny")
    work = tmp_path / "work"
    args = ("--source", str(source), "--ctx", "64", "--json", "--work-dir", str(work))
    one = cli("eval", str(first), *args, "--chunks", "2")
    assert one.returncode == 0, one.stderr
    [evaluated] = (work / "steps" / "gguf.evaluate").iterdir()
    built_at = json.loads((evaluated / "manifest.json").read_text())["built_at"]
    second = tmp_path / "b" / "renamed.gguf"
    second.parent.mkdir()
    first.rename(second)
    two = cli("eval", str(second), *args, "--chunks", "2")
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["ppl"] == json.loads(one.stdout)["ppl"]
    # the evaluation was reused, not run again
    assert [p.name for p in (work / "steps" / "gguf.evaluate").iterdir()] == [evaluated.name]
    assert json.loads((evaluated / "manifest.json").read_text())["built_at"] == built_at
    # a new evaluation of the moved file reads it where it now is (the old folder is gone)
    three = cli("eval", str(second), *args, "--chunks", "3")
    assert three.returncode == 0, three.stderr
    [external] = [json.loads(m.read_text()) for m in (work / "steps" / "gguf.external").glob("*/manifest.json")]
    assert external["data"]["path"] == str(second)
    assert str(tmp_path) not in json.dumps(external["params"])


# ------------------------------------------------------------------------------------------------ BOS

@pytest.mark.slow
@pytest.mark.parametrize(("family", "adds_bos"), [("mistral", True), ("qwen2", False)])
def test_windows_begin_with_bos_only_when_the_tokenizer_adds_one(tmp_path, tiny_models, family, adds_bos):
    from transformers import AutoTokenizer

    from quantforge.steps.evaluation import WINDOWS_FILE, run_tokens

    source = tiny_models(family)
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert tokenizer.bos_token_id is not None or not adds_bos
    step = Step("eval.tokens", "m:eval-tokens", {"dataset": "builtin", "text_sha256": "x", "ctx": 32, "chunks": 4})
    src = StepOutput(source, {"data": {"path": str(source)}})
    data = run_tokens(step, StepContext(step, tmp_path, tmp_path / "log", {"source": src}, None))
    windows = np.load(tmp_path / WINDOWS_FILE)
    assert data["adds_bos"] is adds_bos
    first = set(windows[:, 0].tolist())
    if adds_bos:
        assert first == {tokenizer.bos_token_id}
    else:
        assert len(first) > 1  # the text's own tokens, as llama.cpp's perplexity would see them


# ------------------------------------------------------------------------------------------------ folders

def _files(tmp_path: Path, tag: str, big: int = 0) -> dict[str, tuple[Path, str]]:
    src = tmp_path / f"src-{tag}"
    src.mkdir(exist_ok=True)
    contents = {"m-Q8_0.gguf": b"GGUF" + tag.encode() * 2000 + bytes(big), "quantforge.json": b'{"v": 1}\n',
                "README.md": f"# {tag}\n".encode()}
    out = {}
    for name, data in contents.items():
        (src / name).write_bytes(data)
        out[name] = (src / name, sha256_file(src / name))
    return out


def test_a_published_file_edited_in_place_cannot_touch_the_cache(tmp_path):
    files = _files(tmp_path, "a")
    LocalDirPublisher(tmp_path / "out").publish("acme/m-GGUF", files, private=False, message="m")
    published = tmp_path / "out" / "acme" / "m-GGUF" / "m-Q8_0.gguf"
    with open(published, "r+b") as f:
        f.write(b"EDITED")
    cached, sha = files["m-Q8_0.gguf"]
    assert sha256_file(cached) == sha  # the work dir's copy is untouched
    again = LocalDirPublisher(tmp_path / "out").publish("acme/m-GGUF", files, private=False, message="m")
    assert again.uploaded == ["m-Q8_0.gguf"] and sha256_file(published) == sha


def _publish_in_a_process(root: Path, files: dict, tag: str, barrier) -> None:
    barrier.wait()  # every process starts copying at the same moment
    LocalDirPublisher(root).publish("acme/m-GGUF", files, private=False, message=tag)


def test_two_builds_publishing_into_one_folder_at_once_both_succeed(tmp_path):
    """Four processes (as four builds are: their own pids, no shared memory) publish one repo at once."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    sources = {tag: _files(tmp_path, tag, big=2_000_000) for tag in "abcd"}
    procs = [context.Process(target=_publish_in_a_process, args=(tmp_path / "out", sources[tag], tag, barrier))
             for tag in "abcd"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len({p.pid for p in procs} | {os.getpid()}) == 5
    repo = tmp_path / "out" / "acme" / "m-GGUF"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "m-Q8_0.gguf", "quantforge.json"]
    # every file is one build's whole copy, never a mix or a cut
    for name in ("README.md", "m-Q8_0.gguf"):
        assert sha256_file(repo / name) in {files[name][1] for files in sources.values()}


@pytest.mark.slow
def test_a_full_disk_during_a_folder_publish_says_so_and_leaves_no_partial_file(tmp_path):
    files = _files(tmp_path, "a", big=3_000_000)
    with small_disk(tmp_path / "disk", "1m") as disk:
        with pytest.raises(DiskFull) as info:
            LocalDirPublisher(disk).publish("acme/m-GGUF", files, private=False, message="m")
        repo = disk / "acme" / "m-GGUF"
        left = sorted(p.name for p in repo.iterdir()) if repo.exists() else []
        assert left == []  # no hidden partial file, and no README.md without its files
        # the whole line: where, how much the three files take (3,002,017 bytes), and what is free without the
        # partial copy (about the whole 1 MiB disk)
        free = shutil.disk_usage(disk).free
        assert 1_000_000 <= free <= 1 << 20
        assert str(info.value) == (f"publishing acme/m-GGUF: no space left on device tmpfs ({repo}): need about "
                                   f"3 MB, 1 MB free on {disk}")


@pytest.mark.slow
def test_a_json_write_on_a_full_disk_leaves_no_temp_file(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        fill(disk / "filler", 64 * 1024 - 8192)
        with pytest.raises(DiskFull, match="no space left on device"):
            write_json_atomic(disk / "state.json", {"x": "y" * 100_000})
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_plan_and_build_on_a_full_work_dir_give_one_line_and_no_traceback(tmp_path, tiny_models):
    source = tiny_models("llama")
    targets = tmp_path / "targets.yaml"
    targets.write_text(f"models:\n  - name: t\n    source: {source}\n    formats: {{gguf: {{types: [Q8_0]}}}}\n")
    with small_disk(tmp_path / "work", "64k") as work:
        fill(work / "filler")
        for command in ("plan", "build"):
            proc = cli(command, str(targets), "--work-dir", str(work))
            assert proc.returncode == 1, (command, proc.stderr)
            assert "no space left on device" in proc.stderr and "Traceback" not in proc.stderr
        leftovers = [p for p in work.rglob("*") if p.is_file() and p.name != "filler" and p.stat().st_size == 0]
        assert leftovers == []


# ------------------------------------------------------------------------------------------------ environment

@pytest.mark.slow
def test_push_while_a_build_holds_the_work_dir_says_it_is_in_use(tmp_path, tiny_models):
    source = tiny_models("llama")
    targets = tmp_path / "targets.yaml"
    targets.write_text(f"models:\n  - name: t\n    source: {source}\n    formats: {{gguf: {{types: [Q8_0]}}}}\n")
    work = WorkDir(tmp_path / "work")
    with work.locked():
        proc = cli("push", str(targets), "--work-dir", str(work.root))
    assert proc.returncode == 1 and "in use" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_an_existing_local_folder_without_dot_slash_is_a_local_source(tmp_path, tiny_models):
    source = tiny_models("llama")
    link = tmp_path / "models" / "tiny"
    link.parent.mkdir()
    link.symlink_to(source, target_is_directory=True)
    proc = cli("eval", str(tmp_path / "nope.gguf"), "--source", "models/tiny", "--offline", "--work-dir", "w",
               cwd=tmp_path)
    # the artifact is missing, but the source was taken for the local folder (no Hub lookup, no traceback)
    assert proc.returncode == 2 and "nope.gguf" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_garbage_tokenizer_file_is_named(tmp_path, tiny_models):
    import shutil

    from quantforge.errors import SourceError
    from quantforge.steps.evaluation import run_tokens

    source = tmp_path / "broken"
    shutil.copytree(tiny_models("llama"), source)
    (source / "tokenizer.json").write_bytes(b"\xff\xfe not json \x00")
    step = Step("eval.tokens", "m:eval-tokens", {"dataset": "builtin", "text_sha256": "x", "ctx": 32, "chunks": 2})
    src = StepOutput(source, {"data": {"path": str(source)}})
    with pytest.raises(SourceError, match=r"tokenizer\.json"):
        run_tokens(step, StepContext(step, tmp_path, tmp_path / "log", {"source": src}, None))


def test_finite_json_helper_turns_nan_into_null():
    from quantforge.store import finite_json

    assert strict_json(json.dumps(finite_json({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}}),
                                  allow_nan=False)) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_an_unreachable_hub_is_one_line_that_says_what_to_do(monkeypatch):
    from huggingface_hub import constants

    from quantforge.errors import SourceError
    from quantforge.steps.source import resolve_hub_revision

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SourceError, match=r"cannot reach the Hub.*--offline"):
        resolve_hub_revision("org/m", "main")


# ------------------------------------------------------------------------------------------------ kills

TINY_TARGETS = """
defaults:
  publish: {{to: "dir:./out", namespace: t}}
  evaluation: {{ctx: 64, chunks: 2, max_ppl_increase: {{gguf: 10}}, tokenizer_check: false}}
models:
  - name: t
    source: {source}
    formats: {{gguf: {{types: [{types}]}}}}
"""


def _repo_is_whole(repo: Path) -> None:
    """A README.md in a published folder means its manifest and every file it lists are there."""
    if not (repo / "README.md").exists():
        return
    manifest = json.loads((repo / "quantforge.json").read_text())
    for artifact in manifest["artifacts"].values():
        assert (repo / artifact["artifact"]["file"]).is_file()


@pytest.mark.slow
def test_builds_killed_at_several_points_resume_and_never_publish_half_a_repo(tmp_path, tiny_models):
    import signal
    import time

    targets = tmp_path / "targets.yaml"
    targets.write_text(TINY_TARGETS.format(source=tiny_models("llama"), types="Q8_0"))
    work, repo = tmp_path / "work", tmp_path / "out" / "t" / "t-GGUF"
    command = [sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir", str(work), "--json"]
    planned = subprocess.run([sys.executable, "-m", "quantforge.cli", "plan", str(targets), "--json", "--work-dir",
                              str(work)], capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    keys = {s["label"]: s["key"] for s in json.loads(planned.stdout)["steps"]}
    # kill points: while converting, while quantizing or evaluating, and once the publish folder exists
    points = [lambda: any((work / "tmp").glob("gguf.convert-*")),
              lambda: any((work / "steps").glob("gguf.quantize/*/manifest.json")),
              lambda: repo.exists()]
    for point, reached in enumerate(points):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not reached() and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"kill point {point} was not reached before the build ended"
        _repo_is_whole(repo)
        finished = {p.parent.name for p in (work / "steps").glob("*/*/manifest.json")}
        assert set(keys.values()) - finished, f"kill point {point}: nothing was left to do"
        rerun = subprocess.run(command, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        statuses = {s["label"]: s["status"] for s in strict_json(rerun.stdout)["steps"]}
        assert set(statuses) == set(keys)  # every step is accounted for, none missing
        # every step finished before the kill is reused, every other one built now
        for label, key in keys.items():
            assert statuses[label] == ("reused" if key in finished else "built"), (point, label, statuses[label])
        _repo_is_whole(repo)
        assert (repo / "README.md").is_file()
        shutil.rmtree(work)
        shutil.rmtree(tmp_path / "out")


@pytest.mark.slow
def test_a_build_keeps_third_party_noise_off_the_console(tmp_path, tiny_models):
    targets = tmp_path / "targets.yaml"
    targets.write_text(TINY_TARGETS.format(source=tiny_models("llama"), types="Q8_0, Q4_0"))
    proc = cli("build", str(targets), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines()
             if any(mark in line for mark in ("torchao", "triton", "_pytree", "Warning", "WARNING", "warn(",
                                              "Traceback", "it/s]"))]
    assert noise == [], "\n".join(noise[:10])


@pytest.mark.slow
def test_the_gptq_shape_check_in_the_build_process_prints_nothing(tmp_path, tiny_models):
    """The one torch model the build process itself makes (on the meta device, for GPTQ/AWQ shape checks): what
    torch, transformers and torchao print while importing and building it goes to the step's log."""
    source = tiny_models("llama")
    code = ("import sys; from pathlib import Path; from quantforge.toolchains.gptqmodel import quantized_linears; "
            "layers, n = quantized_linears(Path(sys.argv[1]), False, Path(sys.argv[2])); print(len(layers))")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(tmp_path / "step.log")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "14" and proc.stderr == ""
