"""The layer-streamed forward (quantforge.toolchains.layerwise) against the whole model loaded by transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cgroups import memory_cgroup_or_skip

from quantforge import metrics
from quantforge.toolchains.layerwise import (
    BASELINE_BYTES,
    CheckpointMismatch,
    UnsupportedArchitecture,
    estimate_peak_bytes,
    stream_forward,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 1000
# family -> (config class, extra config): sliding windows shorter than the windows exercise per-layer masks
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                              "tie_word_embeddings": False}),  # one full-attention and one sliding layer, own head
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
}


def make_model(dest: Path, family: str, *, shard: str | None = None, hidden: int = 64, layers: int = 2,
               vocab: int = VOCAB, **overrides) -> Path:
    """Random weights saved as fp16 safetensors, like tests/tiny_models.py (which adds a real tokenizer)."""
    config_cls, extra = FAMILIES[family]
    settings = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 1024, "tie_word_embeddings": True, **extra, **overrides}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**settings),
                                                          dtype=torch.float16)
    model.save_pretrained(dest, **({"max_shard_size": shard} if shard else {}))
    return dest


def windows_for(vocab: int = VOCAB, n: int = 3, ctx: int = 32) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(n, ctx))


def whole_model(model_dir: Path, windows: np.ndarray, imatrix_for: set[int]):
    """What evaluate.run_reference and calibrate.run_imatrix compute today: the whole model, fp32, its hooks."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    sums, counts, collecting = {}, {}, [False]

    def collect(name):
        def hook(_module, args):
            if collecting[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums[name] + (x * x).sum(dim=0) if name in sums else (x * x).sum(dim=0)
                counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.register_forward_pre_hook(collect(name))
    logits = []
    with torch.inference_mode():
        for i, window in enumerate(windows):
            collecting[0] = i in imatrix_for
            logits.append(model(torch.from_numpy(window[None]).long(), use_cache=False).logits[0].float().numpy())
    return logits, {name: (sums[name] / counts[name]).numpy() for name in sums}


def ppl(logits: list[np.ndarray], windows: np.ndarray) -> float:
    return metrics.perplexity(metrics.concat([metrics.score_window(lg, w) for lg, w in zip(logits, windows,
                                                                                           strict=True)]).nll)[0]


@pytest.mark.parametrize(("family", "shard"), [("llama", None), ("llama", "60KB"), ("mistral", None),
                                               ("qwen2", None), ("qwen3", None)])
def test_streamed_equals_whole_model(tmp_path, family, shard):
    model_dir = make_model(tmp_path / family, family, shard=shard)
    if shard:
        assert (model_dir / "model.safetensors.index.json").is_file()
        assert len(set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
                       .values())) > 2
    windows = windows_for()
    got: dict[int, np.ndarray] = {}
    messages: list[str] = []
    imatrix = stream_forward(model_dir, windows, on_logits=got.__setitem__, imatrix_for={0, 2},
                             progress=messages.append)
    expected_logits, expected_imatrix = whole_model(model_dir, windows, {0, 2})

    assert sorted(got) == [0, 1, 2]
    for i, expected in enumerate(expected_logits):
        assert got[i].dtype == np.float32 and got[i].shape == (32, VOCAB)
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-5)
    assert f"{ppl([got[i] for i in range(3)], windows):.4g}" == f"{ppl(expected_logits, windows):.4g}"
    assert imatrix is not None and sorted(imatrix) == sorted(expected_imatrix)
    assert len(imatrix) == 14  # 7 linear layers x 2 decoder layers; the head is left out
    for name, mean in imatrix.items():
        np.testing.assert_allclose(mean, expected_imatrix[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert messages == ["embeddings", "layer 1/2", "layer 2/2", "head"]


def test_bfloat16_equals_whole_model_in_bfloat16(tmp_path):
    """The GPU's dtype, on the CPU: the same casts as from_pretrained(dtype=bfloat16)."""
    model_dir = make_model(tmp_path / "qwen2", "qwen2")
    windows = windows_for(n=2)
    got: dict[int, np.ndarray] = {}
    stream_forward(model_dir, windows, dtype="bfloat16", on_logits=got.__setitem__)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        for i, window in enumerate(windows):
            expected = model(torch.from_numpy(window[None]).long(), use_cache=False).logits[0].float().numpy()
            np.testing.assert_allclose(got[i], expected, rtol=1e-2, atol=1e-2)


def test_imatrix_and_logits_on_different_windows(tmp_path):
    model_dir = make_model(tmp_path / "llama", "llama")
    windows = windows_for(n=4)
    got: dict[int, np.ndarray] = {}
    imatrix = stream_forward(model_dir, windows, logits_for=[3], on_logits=got.__setitem__, imatrix_for=[0, 1])
    expected_logits, expected_imatrix = whole_model(model_dir, windows, {0, 1})
    assert list(got) == [3]
    np.testing.assert_allclose(got[3], expected_logits[3], rtol=1e-5, atol=1e-5)
    assert imatrix is not None
    for name, mean in expected_imatrix.items():
        np.testing.assert_allclose(imatrix[name], mean, rtol=1e-5, atol=1e-7)
    # the importance matrix alone: no logits, no head
    assert stream_forward(model_dir, windows, imatrix_for=[0, 1]).keys() == imatrix.keys()
    assert stream_forward(model_dir, windows, on_logits=lambda *_: None) is None


def _drop(model_dir: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    del tensors[name]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_or_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    windows = windows_for()
    missing = make_model(tmp_path / "missing", "llama")
    _drop(missing, "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(CheckpointMismatch, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.down_proj\.weight"):
        stream_forward(missing, windows, on_logits=lambda *_: None)

    extra = make_model(tmp_path / "extra", "llama")
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].clone()
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatch, match=r"does not use: model\.layers\.2\.mlp\.down_proj\.weight"):
        stream_forward(extra, windows, on_logits=lambda *_: None)

    sharded = make_model(tmp_path / "sharded", "qwen3", shard="60KB")
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatch, match=r"model\.norm\.weight"):
        stream_forward(sharded, windows, on_logits=lambda *_: None)

    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointMismatch, match="only safetensors"):
        stream_forward(sharded, windows, on_logits=lambda *_: None)


def test_moe_checkpoints_converted_on_load_are_refused(tmp_path):
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="converts this architecture's tensors on load"):
        stream_forward(tmp_path, windows_for(), on_logits=lambda *_: None)


def test_bad_window_arguments(tmp_path):
    model_dir = make_model(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="outside"):
        stream_forward(model_dir, windows_for(), on_logits=lambda *_: None, logits_for=[3])
    with pytest.raises(ValueError, match="needs on_logits"):
        stream_forward(model_dir, windows_for(), logits_for=[0])
    with pytest.raises(ValueError, match="2-D"):
        stream_forward(model_dir, windows_for()[0], on_logits=lambda *_: None)


def test_estimate_peak_bytes(tmp_path):
    model_dir = make_model(tmp_path / "llama", "llama", hidden=128, layers=8)
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    fp32, bf16 = estimate_peak_bytes(model_dir, (4, 64)), estimate_peak_bytes(model_dir, (4, 64), "bfloat16")
    # the whole model: the process, the weights in the compute dtype and the checkpoint's fp16 pages it maps, plus
    # one window's attention, MLP and logits (about 1 MB here); tests/test_memory.py measures the figures
    stored = 2 * params
    assert 0 < fp32.whole_model - (BASELINE_BYTES + 4 * params + stored) < 2**21
    assert 0 < bf16.whole_model - (BASELINE_BYTES + 2 * params + stored) < 2**21
    # the model-dependent parts (at this size, the streamed pass's fixed slack outweighs what it saves)
    assert fp32.streamed_device < fp32.whole_model_device and bf16.whole_model < fp32.whole_model


# ------------------------------------------------------------------------------------- under a memory limit

CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from quantforge import metrics
    from quantforge.toolchains.layerwise import stream_forward

    mode, model_dir, procs, vocab = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with torch.device("meta"):  # transformers imports ~100 MB of modules lazily: before the limit applies
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    windows = np.random.default_rng(1).integers(0, vocab, size=(2, 64))
    with open(procs, "w") as f:  # join the limited group: from here on, what this process allocates counts
        f.write(str(os.getpid()))
    parts = []
    if mode == "whole":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            for w in windows:
                parts.append(metrics.score_window(model(torch.from_numpy(w[None]).long()).logits[0].numpy(), w))
    else:
        stream_forward(model_dir, windows, on_logits=lambda i, lg: parts.append(metrics.score_window(lg, windows[i])))
    print(json.dumps({"ppl": metrics.perplexity(metrics.concat(parts).nll)[0]}))
""")


@pytest.mark.slow
def test_streamed_pass_fits_where_the_whole_model_does_not(tmp_path):
    """A 56M-parameter model (225 MB in fp32) under a 120 MB limit on what the process allocates once torch and
    transformers are imported: the whole-model pass is killed, the streamed one finishes with the same PPL
    (measured in the group: whole model 237 MB, streamed 47 MB)."""
    from safetensors import safe_open

    vocab, limit = 4096, 120 * 2**20
    model_dir = make_model(tmp_path / "model", "llama", hidden=768, layers=6, vocab=vocab,
                           intermediate_size=3072, num_attention_heads=12, num_key_value_heads=6)
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        fp32_bytes = 4 * sum(np.prod(f.get_slice(name).get_shape()) for name in f.keys())
    assert fp32_bytes > limit * 1.6
    expected = ppl(whole_model(model_dir, windows_for(vocab, n=2, ctx=64), set())[0], windows_for(vocab, 2, 64))

    results = {}
    for mode in ("whole", "streamed"):
        group = memory_cgroup_or_skip(f"quantforge-test-{os.getpid()}-{mode}", limit)
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(model_dir),
                                   str(group.procs), str(vocab)],
                                  capture_output=True, text=True, timeout=120)
            results[mode] = (proc.returncode, proc.stdout, proc.stderr[-2000:], group.oom_kills(), group.peak_mb())
        finally:
            group.remove()
    returncode, _, stderr, oom_kills, peak = results["whole"]
    assert returncode == -signal.SIGKILL and oom_kills != 0, f"whole model not OOM-killed (peak {peak} MB): {stderr}"
    returncode, stdout, stderr, oom_kills, peak = results["streamed"]
    assert returncode == 0 and not oom_kills, f"streamed pass failed (rc {returncode}, peak {peak} MB): {stderr}"
    assert f"{json.loads(stdout.splitlines()[-1])['ppl']:.4g}" == f"{expected:.4g}"
