"""Real conversions and quantizations with llama.cpp, checked in the llama.cpp runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import FAMILIES, make_untrained_bpe_model

pytestmark = pytest.mark.slow


def quantforge(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, tiny_models):
    """One build of all four tiny families (shared: conversions are the slow part)."""
    root = tmp_path_factory.mktemp("tiny-build")
    models = "\n".join(f"  - {{name: tiny-{f}, source: {tiny_models(f)}}}" for f in FAMILIES)
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  formats: {gguf: {types: [Q8_0, Q4_K_M]}}\n"
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


def test_smollm2_demo_builds_verifies_and_rebuilds_nothing(tmp_path, smollm2_checkpoint):
    """The real model: Q8_0 and Q4_K_M complete the verification prompt correctly in llama.cpp."""
    targets = tmp_path / "smollm2.yaml"
    targets.write_text(f"""
defaults:
  publish: {{to: 'dir:./out', namespace: demo}}
models:
  - name: SmolLM2-135M-Instruct
    source: {smollm2_checkpoint}
    formats:
      gguf: {{types: [Q8_0, Q4_K_M]}}
""")
    work = str(tmp_path / "work")
    first = quantforge("build", str(targets), "--work-dir", work, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    steps = {s["label"]: s for s in report["steps"]}
    for gguf_type in ("Q8_0", "Q4_K_M"):
        verify = steps[f"SmolLM2-135M-Instruct/gguf/{gguf_type}:verify"]["data"]
        assert verify["generated_text"].startswith(" Paris"), verify["generated_text"]
    q4 = steps["SmolLM2-135M-Instruct/gguf/Q4_K_M:quantize"]["data"]
    assert q4["has_chat_template"] and q4["tokenizer_pre"] == "smollm"
    # 576-wide rows: llama.cpp substitutes Q5_0 / Q8_0 for the K-quants, and says so
    assert {(f["wanted"], f["used"]) for f in q4["fallbacks"]} <= {("q4_K", "q5_0"), ("q6_K", "q8_0")}
    assert len(q4["fallbacks"]) > 100

    second = quantforge("build", str(targets), "--work-dir", work, "--json")
    assert second.returncode == 0
    assert set(json.loads(second.stdout)["counts"]) == {"reused"}

    plan = quantforge("plan", str(targets), "--work-dir", work)
    assert "0 of 7 steps to run" in plan.stdout

    # deleting the published folder republishes (copies only), nothing is rebuilt
    import shutil

    shutil.rmtree(tmp_path / "out")
    third = json.loads(quantforge("build", str(targets), "--work-dir", work, "--json").stdout)
    assert third["counts"] == {"reused": 6, "built": 1}
    assert (tmp_path / "out" / "demo" / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct-Q8_0.gguf").is_file()
