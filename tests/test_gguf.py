"""Real conversions and quantizations with llama.cpp, checked in the llama.cpp runtime."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import FAMILIES, make_untrained_bpe_model

pytestmark = pytest.mark.slow


def quantforge(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, tiny_models):
    """One build of all four tiny families (shared: conversions are the slow part)."""
    root = tmp_path_factory.mktemp("tiny-build")
    models = "\n".join(f"  - {{name: tiny-{f}, source: {tiny_models(f)}}}" for f in FAMILIES)
    # random weights: near-uniform distributions, so only the mechanics are measured, with loose gates
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  formats: {gguf: {types: [Q8_0, Q4_K_M]}}\n"
        "  evaluation: {ctx: 64, chunks: 4, max_ppl_increase: {gguf: 0.5}, tokenizer_check: false}\n"
        f"models:\n{models}\n")
    proc = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--json")
    return root, proc


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_converts_quantizes_and_runs_in_llama_cpp(tiny_build, family):
    root, proc = tiny_build
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    steps = {s["label"]: s for s in report["steps"]}
    convert = steps[f"tiny-{family}/gguf:convert"]["data"]
    source = steps[f"tiny-{family}:source"]["data"]["path"]
    vocab_size = json.loads((Path(source) / "config.json").read_text())["vocab_size"]
    # llama.cpp's Llama 3 vocab, round-tripped through transformers, hashes like smaug-bpe (same pre-tokenizer)
    expected_pre = {"llama": "smaug-bpe", "mistral": "default", "qwen2": "qwen2", "qwen3": "qwen2"}[family]
    assert convert["tokenizer_pre"] == expected_pre
    assert convert["tokenizer_model"] == ("llama" if family == "mistral" else "gpt2")
    assert convert["architecture"] == ("llama" if family == "mistral" else family)  # llama.cpp runs Mistral as llama
    for gguf_type, main_tensor_type in (("Q8_0", "Q8_0"), ("Q4_K_M", "Q5_0")):
        quant = steps[f"tiny-{family}/gguf/{gguf_type}:quantize"]["data"]
        # 64-wide rows do not fit K-quants' 256-blocks: llama.cpp falls back, and we record it
        assert main_tensor_type in quant["tensor_type_counts"]
        if gguf_type == "Q4_K_M":
            assert quant["fallbacks"] and all(int(f["ncols"]) % 256 for f in quant["fallbacks"])
            assert {f["tensor"] for f in quant["fallbacks"]} <= set(quant["tensor_types"])
        else:
            assert quant["fallbacks"] == []
        verify = steps[f"tiny-{family}/gguf/{gguf_type}:verify"]["data"]
        assert 1 <= len(verify["generated_ids"]) <= 8 and verify["n_vocab"] == vocab_size
        published = root / "out" / "t" / f"tiny-{family}-GGUF" / f"tiny-{family}-{gguf_type}.gguf"
        assert published.is_file()
    manifest = json.loads((published.parent / "quantforge.json").read_text())
    assert set(manifest["artifacts"]) == {"Q8_0", "Q4_K_M"}
    evaluation = manifest["artifacts"]["Q8_0"]["check"]
    assert evaluation["tokens_scored"] == 4 * 31 and evaluation["gate"]["passed"]
    # random weights predict near-uniformly: PPL is about the vocabulary size, and Q8_0 barely moves it
    assert evaluation["source_ppl"] > vocab_size / 3 and abs(evaluation["delta_ppl"]) < 0.01


def test_one_worker_serves_all_quantizations_of_a_build(tiny_build):
    """Process start-up is a large share of quantizing a small model: one libllama worker runs every
    quantization of the build, each still logging to its own step's log (the fallbacks above come from there)."""
    _, proc = tiny_build
    quantize_logs = [Path(s["log"]).read_text() for s in json.loads(proc.stdout)["steps"]
                     if s["kind"] == "gguf.quantize"]
    assert len(quantize_logs) == 2 * len(FAMILIES)
    pids = {m for text in quantize_logs for m in re.findall(r"served by worker pid (\d+)", text)}
    assert len(pids) == 1
    assert all("llama_model_quantize_impl" in text or "llama_model_loader" in text for text in quantize_logs)


@pytest.mark.parametrize(("family", "same"), [("llama", True), ("qwen2", True), ("qwen3", True), ("mistral", False)])
def test_gguf_tokenizer_parity_with_the_source(tiny_build, family, same):
    """llama.cpp's tokenizer against the HF one on the evaluation sample (with non-ASCII probes). The tiny
    Mistral's HF tokenizer is transformers' reconstruction of llama.cpp's SPM vocab, and it splits 'café'
    differently from llama.cpp: the check must catch exactly that kind of mismatch."""
    _, proc = tiny_build
    steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
    parity = steps[f"tiny-{family}/gguf/Q8_0:evaluate"]["data"]["tokenizer"]
    assert parity["same"] is same, parity


def test_tokenizer_mismatch_fails_the_gate_and_publishes_nothing(tiny_build, tmp_path):
    root, _ = tiny_build
    text = (root / "targets.yaml").read_text().replace("tokenizer_check: false", "tokenizer_check: true")
    text = text.replace("dir:./out", f"dir:{tmp_path / 'out'}")
    (root / "strict.yaml").write_text(text)
    proc = quantforge("build", str(root / "strict.yaml"), "--work-dir", str(root / "work"), "--only", "tiny-mistral")
    assert proc.returncode == 1
    assert "gate gguf/Q8_0 failed: tokenizer differs from the source's: at token" in proc.stderr
    assert not (tmp_path / "out").exists()
    report = json.loads((root / "work" / "reports" / "latest.json").read_text())
    ran = {s["label"] for s in report["steps"] if s["status"] not in ("reused", "not-run")}
    assert ran == {"tiny-mistral/gguf/Q8_0:gate"}  # only the gate's parameter changed: nothing re-measured


def test_header_reader_agrees_with_gguf_py(tiny_build):
    from gguf import GGUFReader

    from quantforge.toolchains.llamacpp import describe_gguf

    root, _ = tiny_build
    path = root / "out" / "t" / "tiny-qwen2-GGUF" / "tiny-qwen2-Q4_K_M.gguf"
    ours = describe_gguf(path)
    reader = GGUFReader(str(path))
    assert ours["tensor_types"] == {t.name: t.tensor_type.name for t in reader.tensors}
    assert ours["n_params"] == sum(int(t.n_elements) for t in reader.tensors)
    assert ours["has_chat_template"] == ("tokenizer.chat_template" in reader.fields)


def test_unknown_bpe_tokenizer_is_a_clear_error(tmp_path, converter):
    source = make_untrained_bpe_model(tmp_path / "odd-bpe")
    (tmp_path / "t.yaml").write_text(f"models:\n  - {{name: odd, source: {source}, formats: {{gguf: {{}}}},"
                                     " publish: {to: 'dir:./out'}}\n")
    proc = quantforge("build", str(tmp_path / "t.yaml"), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode == 1
    assert "odd: llama.cpp's converter does not recognize this tokenizer's BPE pre-tokenizer" in proc.stderr
    assert "hint:" in proc.stderr and "odd__gguf_convert.log" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing published


@pytest.mark.noisy  # the ΔPPL and KLD bands of a real model
def test_smollm2_demo_builds_verifies_and_rebuilds_nothing(tmp_path, smollm2_checkpoint):
    """The real model: Q8_0 and Q4_K_M complete the verification prompt correctly in llama.cpp."""
    targets = tmp_path / "smollm2.yaml"
    spec = """
defaults:
  publish: {{to: 'dir:./out', namespace: demo}}
  evaluation: {{ctx: 256, chunks: 4}}
models:
  - name: SmolLM2-135M-Instruct
    source: {source}
    formats:
      gguf: {{types: [{types}]}}
"""
    targets.write_text(spec.format(source=smollm2_checkpoint, types="Q8_0, Q4_K_M, F16"))
    work = str(tmp_path / "work")
    first = quantforge("build", str(targets), "--work-dir", work, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    steps = {s["label"]: s for s in report["steps"]}
    for gguf_type in ("Q8_0", "Q4_K_M"):
        verify = steps[f"SmolLM2-135M-Instruct/gguf/{gguf_type}:verify"]["data"]
        assert verify["generated_text"].startswith(" Paris"), verify["generated_text"]
    evaluation = {t: steps[f"SmolLM2-135M-Instruct/gguf/{t}:evaluate"]["data"] for t in ("Q8_0", "Q4_K_M", "F16")}
    source_ppl = steps["SmolLM2-135M-Instruct:eval-reference"]["data"]["ppl"]
    # same token ids in torch and llama.cpp: the F16 file reproduces the source's perplexity
    assert f"{evaluation['F16']['ppl']:.4g}" == f"{source_ppl:.4g}"
    assert evaluation["F16"]["kld_mean"] < 1e-3 and evaluation["F16"]["top1"] > 0.98
    assert 0 < evaluation["Q8_0"]["delta_ppl"] < 0.02 < evaluation["Q4_K_M"]["delta_ppl"] < 0.15
    assert evaluation["Q8_0"]["kld_mean"] < evaluation["Q4_K_M"]["kld_mean"]
    assert all(e["tokenizer"]["same"] and e["chat_template"] for e in evaluation.values())
    q4 = steps["SmolLM2-135M-Instruct/gguf/Q4_K_M:quantize"]["data"]
    assert q4["has_chat_template"] and q4["tokenizer_pre"] == "smollm"
    # 576-wide rows: llama.cpp substitutes Q5_0 / Q8_0 for the K-quants, and says so
    assert {(f["wanted"], f["used"]) for f in q4["fallbacks"]} <= {("q4_K", "q5_0"), ("q6_K", "q8_0")}
    assert len(q4["fallbacks"]) > 100

    repo = tmp_path / "out" / "demo" / "SmolLM2-135M-Instruct-GGUF"
    card = (repo / "README.md").read_text()
    for gguf_type in ("Q8_0", "Q4_K_M", "F16"):
        assert f"| [SmolLM2-135M-Instruct-{gguf_type}.gguf](./SmolLM2-135M-Instruct-{gguf_type}.gguf) |" in card
    assert "<|im_start|>" in card and "library_name: gguf" in card
    rendered = quantforge("card", str(targets), "--work-dir", work)
    assert rendered.returncode == 0, rendered.stderr
    assert Path(rendered.stdout.strip()).read_text() == card  # `quantforge card` renders what was published

    check_split_publishing(tmp_path, targets, work, repo)
    check_adhoc_eval(repo / "SmolLM2-135M-Instruct-Q8_0.gguf", smollm2_checkpoint, work, evaluation["Q8_0"])

    second = quantforge("build", str(targets), "--work-dir", work, "--json")
    assert second.returncode == 0
    assert set(json.loads(second.stdout)["counts"]) == {"reused"}

    plan = quantforge("plan", str(targets), "--work-dir", work)
    assert "0 of 17 steps to run" in plan.stdout

    # deleting the published folder republishes (copies only), nothing is rebuilt
    import shutil

    shutil.rmtree(tmp_path / "out")
    third = json.loads(quantforge("build", str(targets), "--work-dir", work, "--json").stdout)
    assert third["counts"] == {"reused": 16, "built": 1}
    assert (repo / "SmolLM2-135M-Instruct-Q8_0.gguf").is_file()
    published_manifest = (repo / "quantforge.json").read_text()

    # corrupt the F16 intermediate's tensor data (as a bad conversion would), then add a type made from it
    intermediate = Path(steps["SmolLM2-135M-Instruct/gguf:convert"]["output_dir"]) / "intermediate.gguf"
    size = intermediate.stat().st_size
    with open(intermediate, "r+b") as f:
        f.seek(size // 3)
        f.write(bytes(size - size // 3))
    targets.write_text(spec.format(source=smollm2_checkpoint, types="Q8_0, Q4_K_M, F16, Q4_0"))
    fourth = quantforge("build", str(targets), "--work-dir", work, "--json")
    assert fourth.returncode == 1
    statuses = {s["label"]: s for s in json.loads(fourth.stdout)["steps"]}
    gate = statuses["SmolLM2-135M-Instruct/gguf/Q4_0:gate"]
    assert gate["status"] == "failed" and "gate gguf/Q4_0 failed: ΔPPL +" in gate["error"]
    assert statuses["SmolLM2-135M-Instruct/gguf:publish"]["status"] == "not-run"  # the build stopped there
    # the reference and token windows were reused, not recomputed
    assert statuses["SmolLM2-135M-Instruct:eval-reference"]["status"] == "reused"
    assert not (repo / "SmolLM2-135M-Instruct-Q4_0.gguf").exists()
    assert (repo / "quantforge.json").read_text() == published_manifest


def test_build_publishes_to_the_hub_only_what_passed_its_gates(tiny_build, tmp_path):
    from hub_server import HubServer

    root, _ = tiny_build
    token = "hf_buildTokenMustNotLeak987"
    with HubServer() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1"}
        strict = (root / "targets.yaml").read_text().replace("tokenizer_check: false", "tokenizer_check: true")
        (root / "hub.yaml").write_text(strict.replace("to: 'dir:./out'", "to: hub"))
        failed = quantforge("build", str(root / "hub.yaml"), "--work-dir", str(root / "work"), "--keep-going",
                            env=env)
        assert failed.returncode == 1 and "tokenizer differs" in failed.stderr
        # every model but the tiny Mistral passed and was published; the Mistral repo was never even created
        assert set(hub.repos) == {"t/tiny-llama-GGUF", "t/tiny-qwen2-GGUF", "t/tiny-qwen3-GGUF"}
        repo = hub.repos["t/tiny-qwen2-GGUF"]
        assert set(repo.files) == {"README.md", "quantforge.json", "tiny-qwen2-Q8_0.gguf", "tiny-qwen2-Q4_K_M.gguf"}
        assert len(repo.commits) == 1

        # push what the lenient build made, Mistral included; unchanged files are not sent again (the lenient
        # build's gates have other keys, which the repo's quantforge.json records: only that file changes)
        pushed = quantforge("push", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--to", "hub",
                            env=env)
        assert pushed.returncode == 0, pushed.stderr
        llama = hub.repos["t/tiny-llama-GGUF"].commits
        assert "t/tiny-mistral-GGUF" in hub.repos and all(not f.endswith(".gguf") for f in llama[-1]["files"])
        logs = "".join(p.read_text(errors="replace") for p in (root / "work" / "logs").glob("*.log"))
        assert token not in failed.stdout + failed.stderr + pushed.stdout + pushed.stderr + logs
        assert any(auth == f"Bearer {token}" for _, _, auth in hub.requests)



def check_split_publishing(tmp_path, targets, work, built_repo):
    """Files over publish.max_file_size go out as llama.cpp split shards, which llama.cpp loads as one model."""
    from quantforge.toolchains.llamacpp import load_and_generate

    split_targets = targets.with_name("split.yaml")
    split_targets.write_text(targets.read_text().replace("namespace: demo}", "namespace: demo, max_file_size: 60MB}"))
    proc = quantforge("push", str(split_targets), "--work-dir", work, "--to", f"dir:{tmp_path / 'split'}")
    assert proc.returncode == 0, proc.stderr
    repo = tmp_path / "split" / "demo" / "SmolLM2-135M-Instruct-GGUF"
    shards = sorted(p.name for p in repo.glob("SmolLM2-135M-Instruct-Q8_0*.gguf"))
    assert shards == [f"SmolLM2-135M-Instruct-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all((repo / s).stat().st_size <= 60_000_000 for s in shards)
    whole = built_repo / "SmolLM2-135M-Instruct-Q8_0.gguf"
    from_split = load_and_generate(repo / shards[0], "The capital of France is", 6, tmp_path / "log", tmp_path)
    from_whole = load_and_generate(whole, "The capital of France is", 6, tmp_path / "log", tmp_path)
    assert from_split["generated_ids"] == from_whole["generated_ids"]
    card = (repo / "README.md").read_text()
    assert f"[{shards[0]}](./{shards[0]})" in card and "split in 3 files" in card
    assert json.loads((repo / "quantforge.json").read_text())["artifacts"]["Q8_0"]["shards"] == shards


def check_adhoc_eval(gguf, source, work, built):
    """`quantforge eval` runs the build's harness, reuses its cached reference, and gives the same figures."""
    args = ["eval", str(gguf), "--source", str(source), "--ctx", "256", "--chunks", "4", "--work-dir", work]
    strict = quantforge(*args, "--max-ppl-increase", "0.0001")
    assert strict.returncode == 1 and "ΔPPL +" in strict.stderr and "exceeds max_ppl_increase 0.01%" in strict.stderr
    assert "Q8_0.gguf:evaluate: never built" in strict.stderr  # the reporter names each step it runs
    assert "eval-reference" not in strict.stderr and "eval-tokens" not in strict.stderr  # the build's, reused
    proc = quantforge(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["ppl"], result["kld_mean"], result["top1"]) == (built["ppl"], built["kld_mean"], built["top1"])
