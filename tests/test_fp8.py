"""FP8 for vLLM (formats/fp8.py): settings, naming, what its steps cost, `quantforge eval` detection, and a tiny
model built to a compressed-tensors FP8 checkpoint, loaded in transformers and scored like every format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_layerwise import VOCAB, make_model

from quantforge.config.loader import load_targets
from quantforge.core.registry import kind_info
from quantforge.core.step import PlanContext
from quantforge.errors import BadInputError
from quantforge.formats.fp8 import DEFAULT_MAX_PPL_INCREASE, FP8Settings, is_fp8_checkpoint
from quantforge.formats.fp8_estimates import BASELINE, QUANTIZE_BASELINE, shapes
from quantforge.pipeline import FORMATS, build_plan, plan_adhoc
from quantforge.steps.disk import SourceSize, output_bytes
from quantforge.steps.duration import step_seconds
from quantforge.steps.memory import estimate_step, is_heavy
from quantforge.store import WorkDir
from quantforge.toolchains.memory import HostMemory

# what compressed-tensors writes for FP8_DYNAMIC, and vLLM reads to choose its FP8 kernels
FP8_DYNAMIC_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"], "format": "float-quantized",
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}},
}


def quantforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True)


# ------------------------------------------------------------------------------------------------ settings

def test_settings_default_to_the_dynamic_scheme_with_nothing_else_ignored():
    settings = FP8Settings()
    assert (settings.scheme, settings.ignore) == ("dynamic", [])
    assert FP8Settings.model_validate({"ignore": ["re:.*mlp.gate$", "model.layers.0.mlp.down_proj"]}).ignore == \
        ["re:.*mlp.gate$", "model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize(("block", "message"), [
    ("{scheme: static}", "formats.fp8.scheme"),
    ("{scheme: dynamic, bits: 8}", "formats.fp8.bits"),
    ("{ignore: ['re:(unclosed']}", "not a regular expression"),
    ("{ignore: ['lm head']}", "expected a module name"),
    ("{ignore: [lm_head, lm_head]}", "listed more than once: lm_head"),
    ("{ignore: lm_head}", "formats.fp8.ignore"),
])
def test_bad_settings_name_the_file_line_and_key(write_targets, block, message):
    path = write_targets(f"""
        models:
          - name: m
            source: ./m
            formats:
              fp8: {block}
    """)
    with pytest.raises(BadInputError) as err:
        load_targets(path, {name: fmt.settings for name, fmt in FORMATS.items()})
    assert message in str(err.value) and f"{path}:5" in str(err.value)


def test_a_gate_key_for_fp8_takes_no_type(write_targets):
    path = write_targets("""
        defaults:
          evaluation: {max_ppl_increase: {fp8/dynamic: 0.1}}
        models:
          - {name: m, source: ./m, formats: {fp8: {}}}
    """)
    with pytest.raises(BadInputError, match="fp8 makes one checkpoint"):
        load_targets(path, {name: fmt.settings for name, fmt in FORMATS.items()})


# ------------------------------------------------------------------------------------------- the plan

@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    # untied head, so that the embeddings and the head count twice in what stays in 16 bits
    model = make_model(tmp_path_factory.mktemp("fp8-source") / "m", "llama", hidden=128, layers=2,
                       tie_word_embeddings=False)
    (model / "tokenizer.json").write_text("{}")  # planned, never tokenized with
    return model


def plan_for(tmp_path: Path, source: Path, evaluation: str = "", formats: str = "{fp8: {}}"):
    targets = tmp_path / "targets.yaml"
    targets.write_text(f"defaults:\n  publish: {{to: 'dir:./out', namespace: t}}\n{evaluation}"
                       f"models:\n  - {{name: m, source: {source}, formats: {formats}}}\n")
    from quantforge.pipeline import load_targets as load

    return build_plan(load(targets), PlanContext(WorkDir(tmp_path / "work")))


def test_a_build_plans_quantize_verify_evaluate_and_gate_and_publishes_as_model_FP8(tmp_path, source):
    plan = plan_for(tmp_path, source)
    steps = {s.label: s for s in plan.steps}
    quantize = steps["m/fp8:quantize"]
    assert quantize.kind == "fp8.quantize" and dict(quantize.params) == \
        {"scheme": "dynamic", "ignore": [], "trust_remote_code": False}
    assert set(quantize.inputs) == {"source"}  # FP8_DYNAMIC needs no calibration text
    assert "compressed-tensors" in quantize.tools
    assert steps["m/fp8:verify"].inputs["artifact"] is quantize
    assert steps["m/fp8:evaluate"].inputs["artifact"] is quantize
    assert steps["m/fp8:gate"].params["max_ppl_increase"] == DEFAULT_MAX_PPL_INCREASE == 0.08
    # the repo is named as every format's: {model}-{FORMAT}
    assert steps["m/fp8:publish"].params["repo_id"] == "t/m-FP8"
    # a changed setting changes the quantization's key, and an unchanged one keeps it
    assert plan_for(tmp_path, source).steps[3].key == plan.steps[3].key
    other = {s.label: s for s in plan_for(tmp_path, source, formats="{fp8: {ignore: ['re:.*down_proj$']}}").steps}
    assert other["m/fp8:quantize"].key != quantize.key


def test_each_fp8_step_says_what_it_costs(tmp_path, source):
    plan = plan_for(tmp_path, source, evaluation="  evaluation: {ctx: 512, chunks: 8}\n")
    steps = {s.label: s for s in plan.steps}
    quantize, verify, evaluate = (steps[f"m/fp8:{name}"] for name in ("quantize", "verify", "evaluate"))
    assert all(is_heavy(s) for s in (quantize, verify, evaluate))

    s = shapes(source)
    assert s.kept_params == 2 * VOCAB * 128 and s.weight_bytes == 2 * s.params  # untied head, fp16
    host = HostMemory(total=64 * 2**30, available=32 * 2**30, cgroup=None)
    q = estimate_step(quantize, host, None)
    # the worker's imports, the whole model as stored, its linear weights in FP8, and the state dict it writes
    assert q.host_bytes == QUANTIZE_BASELINE + s.weight_bytes + s.linear_params + (s.linear_params + 2 * s.kept_params)
    assert "whole model" in q.how
    e = estimate_step(evaluate, host, None)
    # decompressed to float32 on a CPU: above the quantization's need, and it counts 512-token windows' logits
    assert e.host_bytes > q.host_bytes and e.host_bytes - estimate_step(verify, host, None).host_bytes == \
        (512 - 64) * s.vocab * 4 * 3
    on_gpu = estimate_step(evaluate, host, (80 * 2**30, 80 * 2**30))
    assert on_gpu.gpu_bytes > 2 * s.params and on_gpu.host_bytes == BASELINE

    size = SourceSize(total_bytes=16 * 10**9, weight_bytes=15 * 10**9, params=7_500_000_000, vocab_bytes=5_000_000)
    written = output_bytes(quantize, size)
    # a 16-bit 7.5B model: at least one byte per weight, well under the source
    assert size.params < written < 0.7 * size.weight_bytes
    floor, how = kind_info("fp8.quantize").estimates.host_floor(quantize, size)
    assert floor > size.weight_bytes and "whole model" in how
    # evaluation time grows with the windows; a GPU shortens it
    slow = step_seconds(evaluate, size, 4, False)
    assert slow > step_seconds(verify, size, 4, False) and step_seconds(evaluate, size, 4, True) < slow
    fewer = {s.label: s for s in plan_for(tmp_path, source, evaluation="  evaluation: {ctx: 512, chunks: 2}\n").steps}
    assert step_seconds(fewer["m/fp8:evaluate"], size, 4, False) < slow


# ------------------------------------------------------------------------------------ quantforge eval DIR

@pytest.mark.parametrize(("config", "mine"), [
    ({"quantization_config": FP8_DYNAMIC_CONFIG}, True),
    # llm-compressor's static FP8 (per-tensor scales, calibrated activations): vLLM runs it too, and so do we
    ({"quantization_config": {**FP8_DYNAMIC_CONFIG, "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}}}, True),
    ({"quantization_config": {**FP8_DYNAMIC_CONFIG, "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}}, False),  # W4A16
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, False),
    ({"quantization_config": {"quant_method": "compressed-tensors"}}, False),
    ({}, False),
])
def test_an_fp8_checkpoint_is_recognized_by_its_quantization_config(config, mine):
    assert is_fp8_checkpoint(config) is mine


def test_eval_plans_an_fp8_folder_and_leaves_other_folders_to_other_formats(tmp_path, source):
    from quantforge.config.schema import EvaluationSettings

    def plan(folder: Path):
        return plan_adhoc(folder, str(source), "main", EvaluationSettings(ctx=64, chunks=2),
                          PlanContext(WorkDir(tmp_path / "work")), None, None)

    fp8 = tmp_path / "made-elsewhere-FP8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": FP8_DYNAMIC_CONFIG}))
    steps = {s.kind: s for s in plan(fp8).steps}
    assert steps["fp8.external"].local["path"] == str(fp8.resolve())
    assert steps["fp8.evaluate"].inputs["artifact"] is steps["fp8.external"]
    assert steps["gate"].params["gate_name"] == "fp8"
    # the same content elsewhere is the same artifact: keyed by its files, not its path
    moved = tmp_path / "copy"
    moved.mkdir()
    (moved / "config.json").write_bytes((fp8 / "config.json").read_bytes())
    assert {s.kind: s for s in plan(moved).steps}["fp8.evaluate"].key == steps["fp8.evaluate"].key

    int4 = tmp_path / "W4A16"
    int4.mkdir()
    (int4 / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}}))
    with pytest.raises(BadInputError):  # no format claims it
        plan(int4)


# --------------------------------------------------------------------------------- a build, and its consumer

@pytest.fixture(scope="module")
def fp8_build(tmp_path_factory, tiny_models):
    """Tiny Llama (defaults) and Qwen2 (one more layer kind ignored) to FP8, published to a folder, under the
    default gates."""
    root = tmp_path_factory.mktemp("fp8-build")
    sources = {f: tiny_models(f) for f in ("llama", "qwen2")}
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  evaluation: {ctx: 64, chunks: 4}\nmodels:\n"
        f"  - {{name: tiny-llama, source: {sources['llama']}, formats: {{fp8: {{}}}}}}\n"
        f"  - {{name: tiny-qwen2, source: {sources['qwen2']}, formats: {{fp8: {{ignore: ['re:.*down_proj$']}}}}}}\n")
    proc = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
    return root, steps, sources


@pytest.mark.slow
def test_fp8_checkpoint_is_what_vllm_reads_and_loads_in_transformers(fp8_build):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, steps, sources = fp8_build
    repo = root / "out" / "t" / "tiny-llama-FP8"
    config = json.loads((repo / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["quantization_status"]) == \
        ("compressed-tensors", "float-quantized", "compressed")
    assert config["ignore"] == ["lm_head"] and config["kv_cache_scheme"] is None
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    weights, activations = group["weights"], group["input_activations"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["symmetric"], weights["dynamic"]) == \
        (8, "float", "channel", True, False)
    assert (activations["num_bits"], activations["type"], activations["strategy"], activations["dynamic"]) == \
        (8, "float", "token", True)
    with safe_open(repo / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        q_proj = f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_shape()
    linear = [n for n in dtypes if n.endswith("_proj.weight")]
    assert len(linear) == 14 and {dtypes[n] for n in linear} == {"F8_E4M3"}
    assert q_proj == [64, 1]  # one scale per output channel
    assert {dtypes[n.replace(".weight", ".weight_scale")] for n in linear} == {"F16"}  # the source's dtype
    assert dtypes["model.embed_tokens.weight"] == "F16" and "lm_head.weight" not in dtypes  # tied, left alone
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (repo / name).read_bytes() == (sources["llama"] / name).read_bytes(), name

    quantized = steps["tiny-llama/fp8:quantize"]["data"]
    assert (quantized["quantized_layers"], quantized["ignored"], quantized["dtype"]) == (14, ["lm_head"], "float16")
    verify = steps["tiny-llama/fp8:verify"]["data"]
    assert 1 <= len(verify["generated_ids"]) <= 8 and verify["quantized_layers"] == 14
    gate = steps["tiny-llama/fp8:gate"]["data"]
    assert gate["tokens_scored"] == 4 * 31 and gate["tokenizer"]["same"] and gate["dtype"] == "float32"
    assert gate["gate"]["passed"] and gate["gate"]["max_ppl_increase"] == 0.08
    assert all(isinstance(gate[k], float) for k in ("ppl", "kld_mean", "delta_ppl", "top1"))

    # the other model's extra entry: its down projections stay in 16 bits, every other linear layer is FP8
    other = json.loads((root / "out" / "t" / "tiny-qwen2-FP8" / "config.json").read_text())["quantization_config"]
    assert sorted(other["ignore"]) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert steps["tiny-qwen2/fp8:quantize"]["data"]["quantized_layers"] == 12

    # and independently of quantforge's worker: transformers loads the published folder and generates
    model = AutoModelForCausalLM.from_pretrained(repo)
    assert model.model.layers[0].mlp.down_proj.quantization_scheme.weights.type == "float"
    tokenizer = AutoTokenizer.from_pretrained(repo)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.isfinite(model(ids).logits).all()

    card = (repo / "README.md").read_text()
    assert "library_name: transformers" in card and "- fp8" in card and "- vllm" in card
    assert "vllm serve t/tiny-llama-FP8" in card and "compute capability 8.9" in card and "Marlin" in card
    assert "ΔPPL ≤ +8.0%" in card and "on cpu in float32" in card
    manifest = json.loads((repo / "quantforge.json").read_text())
    assert manifest["artifacts"]["fp8"]["artifact"]["scheme"] == "dynamic"


@pytest.mark.slow
def test_quantforge_eval_scores_an_fp8_folder_like_the_build(fp8_build):
    root, steps, sources = fp8_build
    repo = root / "out" / "t" / "tiny-llama-FP8"
    proc = quantforge("eval", str(repo), "--source", str(sources["llama"]), "--ctx", "64", "--chunks", "4",
                      "--work-dir", str(root / "work"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    built = steps["tiny-llama/fp8:evaluate"]["data"]
    # the same windows, the same cached reference, the same runtime: the same figures
    assert (result["ppl"], result["kld_mean"], result["top1"]) == (built["ppl"], built["kld_mean"], built["top1"])
    assert result["gate"] == "pass" and result["tokenizer"]["same"]


@pytest.mark.slow
def test_an_ignore_entry_that_matches_no_layer_fails_the_build_naming_it(tmp_path, tiny_models):
    (tmp_path / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  evaluation: {ctx: 64, chunks: 2}\nmodels:\n"
        f"  - {{name: m, source: {tiny_models('llama')}, formats: {{fp8: {{ignore: [model.layers.0.mlp.gate]}}}}}}\n")
    proc = quantforge("build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode != 0
    assert "formats.fp8.ignore: 'model.layers.0.mlp.gate' matches no linear layer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "t" / "m-FP8").exists()


@pytest.mark.slow
def test_a_model_with_weight_matrices_outside_linear_layers_is_refused_before_anything_is_written(tmp_path):
    import torch
    import transformers

    # transformers 5 holds a mixture-of-experts layer's experts as fused 3-D tensors, not linear layers
    config = transformers.Qwen3MoeConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                         moe_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(tmp_path / "moe")
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "quantforge.formats.fp8_worker", "--result", str(result),
                           "quantize", str(tmp_path / "moe"), str(tmp_path / "out"), "--scheme", "dynamic"],
                          capture_output=True, text=True)
    outcome = json.loads(result.read_text())
    assert proc.returncode == 1 and outcome["bad_input"] and "Traceback" not in proc.stdout + proc.stderr
    assert "outside linear layers (model.layers.0.mlp.experts." in outcome["error"]
    assert "not supported" in outcome["error"] and not (tmp_path / "out").exists()
