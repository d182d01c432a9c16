"""Runner fit: `runner:` in its three forms, and `plan` (--github-matrix included) and `validate` refusing a leg
whose estimated disk, memory or time exceeds its runner, with the figures and the runner to declare, before
anything is installed. The 7B sources here have the sizes of Qwen2-7B without its bytes: files of the Hub's
listing (a loopback Hub), or sparse safetensors files whose headers hold Qwen2-7B's shapes (an HF cache)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

from quantforge.config.runner import RunnerSpec
from quantforge.errors import BadInputError
from quantforge.pipeline import load_targets

REPO = Path(__file__).resolve().parents[1]
SHA = "7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b7b"
# Qwen2-7B's shapes: 7.6B parameters, 15.2 GB in bf16
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
TARGETS = """
defaults:
  publish: {{to: hub, namespace: t}}
  formats: {{gguf: {{types: [Q8_0, Q4_K_M], imatrix: true}}, gptq: {{bits: 4}}}}
models:
  - name: Qwen2-7B
    source: org/qwen2-7b
{runner}"""
LARGER = "    runner: {labels: [self-hosted, big], cores: 64, memory: 64GB, disk: 200GB, timeout: 2d}\n"


def qwen2_7b_tensors() -> dict[str, list[int]]:
    h, inter, kv, vocab = 3584, 18944, 512, 152064
    out = {"model.embed_tokens.weight": [vocab, h], "lm_head.weight": [vocab, h], "model.norm.weight": [h]}
    for i in range(28):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.q_proj.bias": [h],
                p + "self_attn.k_proj.weight": [kv, h], p + "self_attn.k_proj.bias": [kv],
                p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.v_proj.bias": [kv],
                p + "self_attn.o_proj.weight": [h, h], p + "mlp.gate_proj.weight": [inter, h],
                p + "mlp.up_proj.weight": [inter, h], p + "mlp.down_proj.weight": [h, inter],
                p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    return out


def sparse_checkpoint(folder: Path, shards: int = 4) -> int:
    """Qwen2-7B as bf16 safetensors shards whose data is a hole in the file (no byte written): headers, config
    and index are real. Returns the parameter count."""
    folder.mkdir(parents=True)
    tensors = list(qwen2_7b_tensors().items())
    weight_map, params = {}, 0
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tensor, shape in tensors[n::shards]:
            size = 2 * int.__mul__(*shape) if len(shape) == 2 else 2 * shape[0]
            header[tensor] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            weight_map[tensor] = name
            offset += size
            params += size // 2
        raw = json.dumps(header).encode()
        with (folder / name).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(QWEN2_7B))
    (folder / "tokenizer.json").write_text("{}")
    return params


def quantforge(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_DISABLE_XET": "1", **env})


def test_runner_is_a_label_labels_or_a_declared_runner(write_targets):
    path = write_targets("""
        defaults:
          formats: {gguf: {}}
          runner: {labels: [self-hosted, big], memory: 64GB, timeout: 2d}
        models:
          - {name: a, source: org/a}
          - {name: b, source: org/b, runner: ubuntu-latest}
          - {name: c, source: org/c, runner: [self-hosted, gpu]}
          - {name: d, source: org/d, runner: {labels: [ubuntu-latest], cores: 2, memory: 8GB}}
          - {name: e, source: org/e, runner: {labels: x, cores: 8, disk: 2TB, gpu_memory: 80GB, timeout: 90m}}
        """)
    runners = {m.name: m.runner for m in load_targets(path).models}
    sizes = {name: runner.size() for name, runner in runners.items()}
    # a model's own runner replaces the default one: d inherits neither its memory nor its 2-day timeout
    assert (runners["a"].runs_on, sizes["a"].memory, sizes["a"].timeout, sizes["a"].cores) == \
        (["self-hosted", "big"], 64 * 10**9, 2 * 24 * 60, None)
    assert (sizes["b"].cores, sizes["b"].memory, sizes["b"].disk, sizes["b"].timeout, sizes["b"].hosted) == \
        (4, 16 * 10**9, 44 * 10**9, 350, True)  # GitHub's documented figures; 10 minutes left for the reports
    assert sizes["c"].gpu and (sizes["c"].cores, sizes["c"].memory, sizes["c"].timeout) == (None, None, 360)
    assert (sizes["d"].cores, sizes["d"].memory, sizes["d"].disk) == (2, 8 * 10**9, 44 * 10**9)  # a private repo
    assert (sizes["e"].disk, sizes["e"].gpu_memory, sizes["e"].timeout, sizes["e"].gpu) == (2 * 10**12, 8 * 10**10,
                                                                                          90, True)


@pytest.mark.parametrize(("runner", "message"), [
    ("[]", "expected a runner label such as ubuntu-latest"),
    ("{labels: [x], memroy: 64GB}", "runner.memroy: unknown key 'memroy'; did you mean 'memory'?"),
    ("{labels: [x], memory: lots}", "runner.memory: expected a size such as 64GB"),
    ("{labels: [x], disk: 100MB}", "runner.disk: must be at least 1GB"),
    ("{labels: [x], timeout: 6d}", "runner.timeout: must be from 1 minute to 5d"),
    ("{labels: [x], timeout: soon}", "runner.timeout: expected a duration such as 90m, 6h or 5d"),
    ("{labels: [ubuntu-latest], timeout: 8h}", "GitHub stops a job on ubuntu-latest at 6h"),
    ("{cores: 8}", "runner.labels: Field required"),
])
def test_a_bad_runner_is_a_clear_error(write_targets, runner, message):
    path = write_targets(f"models:\n  - {{name: m, source: org/m, formats: {{gguf: {{}}}}, runner: {runner}}}\n")
    with pytest.raises(BadInputError, match=r"targets.yaml:2: models\[0\]\.runner"):
        load_targets(path)
    try:
        load_targets(path)
    except BadInputError as exc:
        assert message in str(exc), str(exc)


@pytest.fixture
def hub_7b(tmp_path):
    """A loopback Hub serving org/qwen2-7b: its real config, index and headers, and its weights' sizes."""
    shards = tmp_path / "shards"
    params = sparse_checkpoint(shards)
    small = tmp_path / "small"
    small.mkdir()
    for path in shards.iterdir():
        (small / path.name).write_bytes(path.read_bytes()[:4096])  # the listing is what planning reads
    with HubServer() as hub:
        hub.seed("org/qwen2-7b", small)
        for path in shards.iterdir():
            hub.repos["org/qwen2-7b"].files[path.name]["size"] = path.stat().st_size
        yield hub, params


def test_plan_refuses_a_7b_leg_on_ubuntu_latest_with_the_figures_and_the_fix(tmp_path, hub_7b):
    hub, params = hub_7b
    assert 7.5e9 < params < 7.7e9
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_test"}
    (tmp_path / "targets.yaml").write_text(TARGETS.format(runner=""))
    proc = quantforge("plan", "targets.yaml", "--github-matrix", cwd=tmp_path, **env)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: leg Qwen2-7B does not fit its runner [ubuntu-latest] (GitHub's documented "
                           "ubuntu-latest): ")
    # GPTQModel holds the whole model in fp16 (it does not stream), and GPTQ on 4 cores takes a day and more
    assert "memory about 16.1" in line and "Qwen2-7B/gptq:quantize: GPTQModel loads the whole model in fp16" in line
    assert "> 15.00 GB usable of 16.00 GB" in line
    time = re.search(r"time about ([\d.]+) h \(longest step Qwen2-7B/gptq:quantize ([\d.]+) h; on 4 cores\) > the "
                     r"5\.8 h it may run", line)
    assert time and float(time[1]) > float(time[2]) > 24, line
    # 64 cores would do it in the 6 hours: 16 times the work per second, less the install
    assert "fix: declare a larger runner: runner: {labels: [your-larger-runner], cores: 64, memory: 32GB}" in line
    # the same leg on a runner that declares enough
    (tmp_path / "targets.yaml").write_text(TARGETS.format(runner=LARGER))
    proc = quantforge("plan", "targets.yaml", "--github-matrix", cwd=tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    [leg] = json.loads(proc.stdout)["include"]
    assert (leg["runs-on"], leg["timeout"], leg["hosted"], leg["gpu"]) == (["self-hosted", "big"], 2880, False, False)
    # with eviction, publishing to the Hub: the source, the F16 intermediate and Q8_0 (15.2 + 15.2 + 8.1 GB)
    assert leg["disk_bytes"] == pytest.approx(2 * params * 2 + params * 8.5 / 8, rel=0.01)
    assert leg["memory_bytes"] == pytest.approx(0.94e9 + 2 * params, rel=0.01)
    assert 3600 < leg["time_seconds"] < 6 * 3600 and leg["time"].endswith(" h") and "note:" not in proc.stderr


def test_validate_and_plan_check_a_7b_in_the_local_cache(tmp_path):
    hf = tmp_path / "hf"
    cache = hf / "hub" / "models--org--qwen2-7b"
    sparse_checkpoint(cache / "snapshots" / SHA)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(SHA)
    env = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "targets.yaml").write_text(TARGETS.format(runner="    runner: {labels: [ubuntu-latest], cores: 2, "
                                                                  "memory: 8GB}\n"))
    proc = quantforge("validate", "targets.yaml", cwd=tmp_path, **env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # with the shapes known, the torch passes stream (4-5 GB), and GPTQModel's whole fp16 model is what does not fit
    assert "error: leg Qwen2-7B does not fit its runner [ubuntu-latest] (ubuntu-latest, with declared cores, " \
           "memory): memory about 18." in proc.stderr and "> 7.00 GB usable of 8.00 GB" in proc.stderr
    assert "memory: 32GB" in proc.stderr
    assert quantforge("validate", "targets.yaml", "--no-runner-check", cwd=tmp_path, **env).returncode == 0
    # plan says the same of the leg that would run (every step: nothing is built or published)
    plan = quantforge("plan", "targets.yaml", "--offline", cwd=tmp_path, **env)
    assert plan.returncode == 2 and "memory about 18." in plan.stderr
    # GGUF alone streams, and fits in 8 GB and on the disk; on 2 cores it takes longer than the job may run
    gguf_only = TARGETS.replace(", gptq: {{bits: 4}}", "")
    (tmp_path / "targets.yaml").write_text(gguf_only.format(runner="    runner: {labels: [ubuntu-latest], cores: 2, "
                                                                     "memory: 8GB}\n"))
    gguf = quantforge("validate", "targets.yaml", cwd=tmp_path, **env)
    assert gguf.returncode == 2 and "memory about" not in gguf.stderr and "disk about" not in gguf.stderr
    assert "time about" in gguf.stderr and "runner: {labels: [your-larger-runner], cores: 4}" in gguf.stderr
    # which the 4 cores of a public repository's ubuntu-latest give it
    (tmp_path / "targets.yaml").write_text(gguf_only.format(runner=""))
    assert quantforge("validate", "targets.yaml", cwd=tmp_path, **env).returncode == 0


def test_validate_notes_what_it_cannot_check(tmp_path, write_targets):
    (tmp_path / "targets.yaml").write_text("defaults: {formats: {gguf: {}}}\nmodels:\n"
                                           "  - {name: far, source: org/not-cached}\n")
    proc = quantforge("validate", "targets.yaml", cwd=tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert "note: far: runner fit not checked (org/not-cached@main: offline, and the local Hugging Face cache has " \
           "no such revision" in proc.stderr and "plan checks it" in proc.stderr


def test_a_runner_of_unknown_size_is_a_note_not_an_error():
    spec = RunnerSpec.model_validate(["self-hosted", "gpu"])
    size = spec.size()
    assert (size.cores, size.memory, size.disk, size.gpu, size.hosted) == (None, None, None, True, False)
    assert "unknown" in size.where
