"""Verification by the real consumer rejects a broken GGUF before it is measured against a gate or published: a
file whose weights are NaN (llama.cpp's logits are not finite), and a file that generates no token (its first
greedy choice is end-of-sequence). The files are a tiny model's real F16 quantization, broken after it is
written, as a faulty converter or quantizer would leave them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

F16_NAN = 0x7E00  # a quiet NaN in IEEE half precision


def fill_with_nan(path: Path) -> int:
    """Overwrite every F16 tensor's data in place; the number of tensors overwritten."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(path, "r+")
    hit = 0
    for tensor in reader.tensors:
        if tensor.tensor_type == GGMLQuantizationType.F16:
            tensor.data.view(np.uint16)[...] = F16_NAN
            hit += 1
    reader.data.flush()
    return hit


def end_at_first_token(path: Path) -> int:
    """Make the file's end-of-sequence token the one it greedily generates first after the verification prompt;
    that token."""
    from gguf import GGUFReader

    from quantforge.steps.evaluation import VERIFY_PROMPT
    from quantforge.toolchains.llamacpp import load_and_generate

    with tempfile.TemporaryDirectory() as scratch:
        first = load_and_generate(path, VERIFY_PROMPT, 1, Path(scratch) / "log", Path(scratch))["generated_ids"][0]
    reader = GGUFReader(path, "r+")
    field = reader.fields["tokenizer.ggml.eos_token_id"]
    field.parts[field.data[0]][0] = first
    reader.data.flush()
    return first


def test_a_nan_file_and_a_mute_file_fail_verification_and_are_neither_gated_nor_published(tmp_path, tiny_models,
                                                                                            monkeypatch):
    from gguf import GGUFReader

    from quantforge import cli
    from quantforge.toolchains import llamacpp

    quantize = llamacpp.quantize
    broken: dict[str, int] = {}

    def quantize_then_break(in_file: Path, out_file: Path, gguf_type: str, log_path: Path, *args, **kwargs):
        result = quantize(in_file, out_file, gguf_type, log_path, *args, **kwargs)
        if out_file.name.startswith("nan-"):
            broken["nan"] = fill_with_nan(out_file)
        elif out_file.name.startswith("mute-"):
            broken["mute"] = end_at_first_token(out_file)
        return result

    monkeypatch.setattr(llamacpp, "quantize", quantize_then_break)
    source = tiny_models("llama")
    (tmp_path / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  formats: {gguf: {types: [F16]}}\n"
        "  evaluation: {ctx: 64, chunks: 2, max_ppl_increase: {gguf: 10}, tokenizer_check: false}\n"
        f"models:\n  - {{name: nan, source: {source}}}\n  - {{name: mute, source: {source}}}\n"
        f"  - {{name: sound, source: {source}}}\n")
    result = CliRunner().invoke(cli.app, ["build", str(tmp_path / "targets.yaml"), "--work-dir",
                                          str(tmp_path / "work"), "--keep-going", "--json"])
    assert result.exit_code == 1, result.output
    steps = {s["label"]: s for s in json.loads(result.stdout)["steps"]}
    assert broken["nan"] >= 7 and broken["mute"] >= 0  # the breakage happened: weights overwritten, EOS moved

    nan_file = Path(steps["nan/gguf/F16:quantize"]["output_dir"]) / "nan-F16.gguf"
    weights = next(t for t in GGUFReader(nan_file).tensors if t.name == "blk.0.attn_q.weight")
    assert np.isnan(weights.data.astype(np.float32)).all()
    nan_verify = steps["nan/gguf/F16:verify"]
    assert nan_verify["status"] == "failed"
    assert nan_verify["error"] == "llama.cpp could not run nan-F16.gguf: non-finite logits after 0 generated tokens"
    mute_verify = steps["mute/gguf/F16:verify"]
    assert mute_verify["status"] == "failed"
    assert mute_verify["error"] == ("mute-F16.gguf: llama.cpp generated no token (its first choice was "
                                    "end-of-sequence) after 'The capital of France is'")
    for model in ("nan", "mute"):
        assert steps[f"{model}/gguf/F16:gate"]["status"] == "skipped"
        assert steps[f"{model}/gguf:publish"]["status"] == "skipped"
        assert not (tmp_path / "out" / "t" / f"{model}-GGUF").exists()
    # the same model, unbroken, verifies (it generates a token that is not EOS), passes its gate and is published
    sound = steps["sound/gguf/F16:verify"]
    assert sound["status"] == "built" and sound["data"]["generated_ids"][0] == broken["mute"]
    assert steps["sound/gguf:publish"]["status"] == "built"
    assert (tmp_path / "out" / "t" / "sound-GGUF" / "sound-F16.gguf").is_file()
