"""MLX through mlx-lm: settings, repo names, the RoPE keys mlx-lm reads, what the steps cost, plan-time refusals,
and (slow) real builds of tiny models checked and scored by mlx-lm itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantforge.config.loader import load_targets as load_targets_file
from quantforge.core.registry import kind_info
from quantforge.core.step import PlanContext
from quantforge.errors import BadInputError, ConfigError
from quantforge.formats import mlx
from quantforge.formats.mlx_costs import effective_bits
from quantforge.formats.mlx_worker import patch_rope
from quantforge.pipeline import FORMATS, build_plan, load_targets
from quantforge.steps.disk import SourceSize
from quantforge.store import WorkDir


def quantforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True)


def model_with(write_targets, fmt: str, extra: str = "", source: str = "org/m"):
    path = write_targets(f"models:\n  - name: m\n    source: {source}\n    formats: {{{fmt}}}\n{extra}")
    return load_targets(path).models[0]


# ------------------------------------------------------------------------------------------------ settings

def test_defaults_are_mlx_communitys_4_bit_group_64(write_targets):
    settings = model_with(write_targets, "mlx: {}").formats.mlx
    assert (settings.bits, settings.group_size, settings.recipe, settings.dtype) == (4, 64, None, "auto")
    assert settings.low_bits() == 4 and settings.card_settings()[:2] == ["4-bit", "group size 64"]


@pytest.mark.parametrize(("fmt", "problem"), [
    ("mlx: {bits: 7}", "models[0].formats.mlx.bits"),
    ("mlx: {bits: '4'}", "models[0].formats.mlx.bits"),
    ("mlx: {group_size: 16}", "models[0].formats.mlx.group_size"),
    ("mlx: {group_size: -1}", "models[0].formats.mlx.group_size"),
    ("mlx: {recipe: mixed_5_8}", "models[0].formats.mlx.recipe"),
    ("mlx: {recipe: mixed_3_6, bits: 4}", "recipe mixed_3_6 sets each layer's bits; drop bits"),
    ("mlx: {dtype: float32}", "models[0].formats.mlx.dtype"),
    ("mlx: {bit: 4}", "did you mean 'bits'?"),
])
def test_bad_settings_are_refused_with_their_line(write_targets, fmt, problem):
    path = write_targets(f"models:\n  - name: m\n    source: org/m\n    formats: {{{fmt}}}\n")
    with pytest.raises(ConfigError) as err:
        load_targets(path)
    assert problem in str(err.value) and f"{path}:4:" in str(err.value)


def test_a_recipe_sets_the_low_bits_and_the_default_gate(write_targets, tmp_path):
    settings = model_with(write_targets, "mlx: {recipe: mixed_3_6}").formats.mlx
    assert settings.low_bits() == 3 and settings.card_settings()[0] == "mixed_3_6 (mostly 3-bit)"
    assert mlx.DEFAULT_MAX_PPL_INCREASE_BY_BITS[settings.low_bits()] == 0.5


def test_mlx_gates_take_no_type(write_targets):
    with pytest.raises(ConfigError, match="mlx makes one checkpoint"):
        model_with(write_targets, "mlx: {}", "    evaluation: {max_ppl_increase: {mlx/4bit: 0.1}}\n")
    model = model_with(write_targets, "mlx: {}", "    evaluation: {max_ppl_increase: {mlx: 0.6}}\n")
    assert model.evaluation.gate("max_ppl_increase", "mlx", None, 0.25) == 0.6


# ------------------------------------------------------------------------------------------------ repo names

@pytest.mark.parametrize(("fmt", "template", "repo"), [
    ("mlx: {}", None, "acme/m-MLX-4bit"),
    ("mlx: {bits: 8}", None, "acme/m-MLX-8bit"),
    ("mlx: {recipe: mixed_3_6}", None, "acme/m-MLX-mixed-3-6"),
    ("mlx: {bits: 8}", "{model}-{format}", "acme/m-mlx-8bit"),
    ("mlx: {}", "Other-{FORMAT}", "acme/Other-MLX-4bit"),
])
def test_repos_are_named_like_lm_studios_mlx_repos(write_targets, fmt, template, repo):
    from quantforge.card import repo_id

    publish = "    publish: {namespace: acme" + (f", repo: '{template}'" if template else "") + "}\n"
    model = model_with(write_targets, fmt, publish)
    assert repo_id(model, "mlx") == repo


def test_the_gguf_repo_keeps_its_name_beside_an_mlx_one(write_targets):
    from quantforge.card import repo_id

    model = model_with(write_targets, "gguf: {}, mlx: {bits: 8}", "    publish: {namespace: acme}\n")
    assert (repo_id(model, "gguf"), repo_id(model, "mlx")) == ("acme/m-GGUF", "acme/m-MLX-8bit")


def test_two_bit_widths_of_one_model_are_two_entries_with_their_own_repos(write_targets):
    path = write_targets("defaults:\n  publish: {namespace: acme}\nmodels:\n"
                         "  - {name: m, source: org/m, formats: {mlx: {bits: 4}}}\n"
                         "  - {name: m-8, source: org/m, publish: {repo: 'm-{FORMAT}'}, formats: {mlx: {bits: 8}}}\n")
    from quantforge.card import repo_id

    models = load_targets(path).models
    assert [repo_id(m, "mlx") for m in models] == ["acme/m-MLX-4bit", "acme/m-MLX-8bit"]
    clash = write_targets("defaults:\n  publish: {namespace: acme}\nmodels:\n"
                          "  - {name: m, source: org/m, formats: {mlx: {bits: 4}}}\n"
                          "  - {name: m-8, source: org/m, publish: {repo: 'm-MLX-4bit'}, formats: {mlx: {}}}\n",
                          name="clash.yaml")
    with pytest.raises(ConfigError, match=r"renders to acme/m-MLX-4bit, which models\[0\] .* also publishes to"):
        load_targets_file(clash, {name: fmt.settings for name, fmt in FORMATS.items()})


# ------------------------------------------------------------------------------------------------ RoPE keys

def test_rope_parameters_are_copied_where_mlx_lm_reads_them():
    # transformers 5 writes rope_parameters; mlx-lm's llama reads a top-level rope_theta (default 10000)
    config = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert patch_rope(config) == ["rope_theta"]
    assert config["rope_theta"] == 100000.0 and "rope_scaling" not in config

    scaled = {"rope_theta": 500000.0, "rope_parameters": {
        "rope_theta": 1.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "partial_rotary_factor": 0.5}}
    assert patch_rope(scaled) == ["partial_rotary_factor", "rope_scaling"]
    assert scaled["rope_theta"] == 500000.0  # a top-level key already there is the model's own: kept
    assert scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert scaled["partial_rotary_factor"] == 0.5

    nested = {"model_type": "gemma3", "text_config": {"rope_parameters": {"rope_theta": 1e6}}}
    assert patch_rope(nested) == ["text_config.rope_theta"] and nested["text_config"]["rope_theta"] == 1e6
    assert patch_rope({"rope_theta": 1e4}) == []  # a transformers 4 config: nothing to do


# ------------------------------------------------------------------------------------------------ costs

SMOLLM2 = SourceSize(total_bytes=541_000_000, weight_bytes=538_090_408, params=134_515_008,
                     vocab_bytes=3_522_871 // 2)


def _mlx_steps(tmp_path, write_targets, fmt: str):
    from tiny_models import fake_checkpoint

    ckpt = fake_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    path = write_targets(f"models:\n  - name: m\n    source: ./ckpt\n    formats: {{{fmt}}}\n")
    return {s.kind: s for s in build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "work"))).steps}


def test_each_step_says_what_it_costs(tmp_path, write_targets):
    steps = _mlx_steps(tmp_path, write_targets, "mlx: {}")
    assert [k for k in steps if k.startswith("mlx.")] == ["mlx.convert", "mlx.verify", "mlx.evaluate"]
    convert, evaluate = kind_info("mlx.convert").estimates, kind_info("mlx.evaluate").estimates
    assert convert.memory and convert.output_bytes and convert.seconds and convert.host_floor
    assert evaluate.memory and evaluate.seconds and kind_info("mlx.verify").estimates.seconds
    # SmolLM2-135M, 4-bit, group 64, bf16 scales: mlx-lm wrote 75.8 MB of weights and a 3.5 MB tokenizer
    out = convert.output_bytes(steps["mlx.convert"], SMOLLM2)
    assert 0.95 * (75_790_402 + 3_522_871) < out < 1.05 * (75_790_402 + 3_522_871)
    floor, how = convert.host_floor(steps["mlx.convert"], SMOLLM2)
    assert 600 * 2**20 < floor < 1.5 * 2**30 and "5 GB" in how
    # the evaluation runs on one core at about 10 tokens a second for a 135M model, whatever the runner has
    seconds = evaluate.seconds(steps["mlx.evaluate"], SMOLLM2, 4, False)
    assert seconds == evaluate.seconds(steps["mlx.evaluate"], SMOLLM2, 64, True) > 0


@pytest.mark.parametrize(("params", "bits"), [({"bits": 4}, 4.0), ({"bits": 8}, 8.0),
                                              ({"recipe": "mixed_3_6"}, 3.3), ({"recipe": "mixed_2_6"}, 2.4)])
def test_effective_bits(params, bits):
    assert effective_bits(params) == pytest.approx(bits)


# ------------------------------------------------------------------------------------------------ plan time

def _checkpoint(tmp_path, config: dict) -> Path:
    from tiny_models import fake_checkpoint

    ckpt = fake_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").write_text(json.dumps({"torch_dtype": "float16", **config}))
    return ckpt


def test_plan_refuses_a_group_size_that_would_leave_layers_unquantized(tmp_path, write_targets):
    _checkpoint(tmp_path, {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536})
    context = PlanContext(work=WorkDir(tmp_path / "work"))
    fits = write_targets("models:\n  - {name: m, source: ./ckpt, formats: {mlx: {group_size: 64}}}\n")
    assert build_plan(load_targets(fits), context).steps
    misfit = write_targets("models:\n  - {name: m, source: ./ckpt, formats: {mlx: {group_size: 128}}}\n",
                           name="misfit.yaml")
    with pytest.raises(BadInputError, match=r"m: formats\.mlx\.group_size 128 does not divide the model's "
                                            r"hidden_size 576 \(config\.json\).*use 32 or 64"):
        build_plan(load_targets(misfit), context)


def test_plan_refuses_an_architecture_mlx_lm_does_not_implement(tmp_path, write_targets):
    _checkpoint(tmp_path, {"model_type": "no_such_arch", "hidden_size": 64})
    path = write_targets("models:\n  - {name: m, source: ./ckpt, formats: {mlx: {}}}\n")
    with pytest.raises(BadInputError, match=r"mlx-lm [\d.]+ has no implementation of model_type 'no_such_arch'"):
        build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "work")))


def test_mlx_lm_s_own_table_is_read_without_importing_it():
    assert mlx.mlx_lm_knows("llama") and mlx.mlx_lm_knows("qwen2")
    assert mlx.mlx_lm_knows("mistral")  # mlx-lm runs it as llama (its MODEL_REMAPPING)
    assert mlx.mlx_lm_knows("no_such_arch") is False and mlx.mlx_lm_knows(None) is False
    # importing mlx-lm takes seconds (transformers): a plan must not
    proc = subprocess.run([sys.executable, "-c", "import sys; from quantforge.formats.mlx import mlx_lm_knows; "
                           "assert mlx_lm_knows('llama'); print(sorted(m for m in sys.modules if 'mlx' in m))"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(["quantforge.formats.mlx",
                                                                  "quantforge.formats.mlx_costs"]), proc.stderr


@pytest.mark.parametrize(("config", "dtype"), [({"dtype": "float16"}, "float16"), ({"torch_dtype": "bfloat16"},
                                               "bfloat16"), ({"dtype": "float32"}, "bfloat16"), ({}, "bfloat16")])
def test_auto_dtype_keeps_a_16_bit_source_s(tmp_path, config, dtype):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert mlx.source_dtype(tmp_path) == dtype


def test_eval_recognizes_an_mlx_folder_and_nothing_else(tmp_path):
    from quantforge.core.formats import EvalSteps
    from quantforge.core.step import Step

    folder = tmp_path / "m-MLX-4bit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": {
        "bits": 4, "group_size": 64, "mode": "affine"}}))
    (folder / "model.safetensors").write_bytes(b"0")
    source = Step("source", "s", params={"digest": "d"})
    evaluation = EvalSteps(Step("eval.tokens", "t", {}), Step("eval.reference", "r", {}), None)  # type: ignore[arg-type]
    context = PlanContext(work=WorkDir(tmp_path / "work"))
    found = mlx.adhoc(folder, source, evaluation, context)
    assert found is not None and found.format == "mlx" and found.evaluate.kind == "mlx.evaluate"
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert mlx.adhoc(folder, source, evaluation, context) is None
    assert mlx.adhoc(tmp_path / "nothing", source, evaluation, context) is None


# ------------------------------------------------------------------------------------------------ card

def test_the_card_says_how_to_run_it_in_mlx_lm_and_lm_studio(tmp_path):
    from huggingface_hub import ModelCard

    from quantforge.core.formats import BuiltArtifact, CardInputs, ReleaseInfo
    from quantforge.core.step import StepOutput

    src = tmp_path / "src"
    src.mkdir()
    (src / "chat_template.jinja").write_text("{{ messages }}")
    source = StepOutput(src, {"params": {"source": "org/tiny", "files": {}}, "data": {"path": str(src),
                                                                                      "commit": "a" * 40}})
    tokens = StepOutput(tmp_path, {"params": {"dataset": "builtin", "ctx": 512, "chunks": 8}})
    built = StepOutput(tmp_path, {"tools": {"mlx-lm": "0.32.2", "mlx": "0.32.4"}, "data": {
        "bits": 4, "group_size": 64, "recipe": None, "dtype": "bfloat16", "size": 80_000_000,
        "bits_per_weight": 4.503, "architecture": "llama", "convert_seconds": 2.5,
        "unquantized_layers": {"model.layers.0.mlp.gate": 576}}})
    gate = StepOutput(tmp_path, {"data": {"ppl": 25.75, "ppl_err": 0.5, "source_ppl": 17.217, "delta_ppl": 0.496,
                                          "kld_mean": 0.422, "top1": 0.699, "tokens_scored": 2040,
                                          "compute_dtype": "float32", "device": "cpu",
                                          "gate": {"max_ppl_increase": 0.75, "enforced": True, "passed": True}}})
    card = CardInputs(repo_id="acme/tiny-MLX-4bit", model="tiny", namespace="acme", source=source, tokens=tokens,
                      artifacts=(BuiltArtifact("mlx", built, gate),),
                      release=ReleaseInfo(siblings=(("gguf", "acme/tiny-GGUF"),)))
    text = mlx.FORMAT.render_card(card)
    data = ModelCard(text).data
    assert data.library_name == "mlx" and data.base_model == "org/tiny" and {"mlx", "4-bit", "llama"} <= set(data.tags)
    assert "| MLX 4-bit | 4-bit, group size 64, affine (a scale and a bias per group) | 80 MB | 4.50 | " \
           "25.750 ± 0.500 | +49.60% | 0.4220 | 69.9% | ΔPPL ≤ +75.0% |" in text
    assert "mlx_lm.generate --model acme/tiny-MLX-4bit" in text and 'load("acme/tiny-MLX-4bit")' in text
    assert "tokenizer.apply_chat_template(messages, add_generation_prompt=True)" in text  # the source has one
    assert "lms get https://huggingface.co/acme/tiny-MLX-4bit" in text
    assert "on a CPU computing in\nfloat32" in text and "stored bfloat16" in text
    assert "Left unquantized, as mlx-lm chose: model.layers.0.mlp.gate." in text
    assert "GGUF ([acme/tiny-GGUF](https://huggingface.co/acme/tiny-GGUF))" in text
    assert "mlx-lm 0.32.2 on mlx 0.32.4" in text


# ------------------------------------------------------------------------------------------------ real builds

@pytest.fixture(scope="module")
def mlx_build(tmp_path_factory, tiny_models):
    """One build: a tiny Llama to MLX 4-bit and, as a second entry publishing beside it, 8-bit, with the default
    gates (random weights predict nearly uniformly, which quantization hardly moves)."""
    root = tmp_path_factory.mktemp("mlx")
    source = tiny_models("llama")
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  evaluation: {ctx: 64, chunks: 2}\nmodels:\n"
        f"  - {{name: tiny, source: {source}, formats: {{mlx: {{}}}}}}\n"
        f"  - {{name: tiny-8, source: {source}, publish: {{repo: 'tiny-{{FORMAT}}'}},\n"
        "     formats: {mlx: {bits: 8}}}\n")
    proc = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, {s["label"]: s for s in json.loads(proc.stdout)["steps"]}, source


@pytest.mark.slow
@pytest.mark.parametrize(("model", "bits"), [("tiny", 4), ("tiny-8", 8)])
def test_a_tiny_model_becomes_an_mlx_folder_that_mlx_lm_loads_and_scores(mlx_build, model, bits):
    root, steps, source = mlx_build
    repo = root / "out" / "t" / f"tiny-MLX-{bits}bit"
    assert sorted(p.name for p in repo.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
        "quantforge.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((repo / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"bits": bits, "group_size": 64,
                                                                      "mode": "affine"}
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # where mlx-lm reads it
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (repo / name).read_bytes() == (source / name).read_bytes(), name  # the source's own

    convert = steps[f"{model}/mlx:convert"]["data"]
    assert convert["quantized_layers"] == 15 and convert["unquantized_layers"] == {}  # 14 linear + the embedding
    assert convert["dtype"] == "float16" and convert["rope_patched"] == ["rope_theta"]
    assert bits < convert["bits_per_weight"] < bits + 0.6  # a float16 scale and bias per 64 weights: +0.5
    verify = steps[f"{model}/mlx:verify"]["data"]
    assert 1 <= len(verify["generated_ids"]) <= 8 and verify["compute_dtype"] == "float32"
    gate = steps[f"{model}/mlx:gate"]["data"]
    assert gate["tokens_scored"] == 2 * 31 and gate["tokenizer"]["same"] and not gate["chat_template_missing"]
    assert all(isinstance(gate[k], float) for k in ("ppl", "source_ppl", "delta_ppl", "kld_mean", "top1"))
    # passed under the default gate for its bit width, not a loosened one
    assert gate["gate"]["passed"] and gate["gate"]["max_ppl_increase"] == mlx.DEFAULT_MAX_PPL_INCREASE_BY_BITS[bits]
    assert gate["sample"] == verify["generated_text"]

    card = (repo / "README.md").read_text()
    assert "library_name: mlx" in card and f"- {bits}-bit" in card and "- mlx" in card
    assert f"mlx_lm.generate --model t/tiny-MLX-{bits}bit" in card
    assert f"lms get https://huggingface.co/t/tiny-MLX-{bits}bit" in card
    manifest = json.loads((repo / "quantforge.json").read_text())
    assert manifest["artifacts"]["mlx"]["artifact"]["bits"] == bits

    # and independently of quantforge's worker: mlx-lm loads the published folder and generates
    proc = subprocess.run([sys.executable, "-c", "import sys, mlx_lm; model, tok = mlx_lm.load(sys.argv[1]); "
                           "print(repr(mlx_lm.generate(model, tok, 'The capital of France is', max_tokens=4)))",
                           str(repo)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]


@pytest.mark.slow
def test_a_second_build_runs_nothing_and_eval_scores_the_folder_like_the_build(mlx_build):
    root, steps, source = mlx_build
    again = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--json")
    assert again.returncode == 0 and {s["status"] for s in json.loads(again.stdout)["steps"]} <= {"reused", "fresh"}
    repo = root / "out" / "t" / "tiny-MLX-4bit"
    proc = quantforge("eval", str(repo), "--source", str(source), "--ctx", "64", "--chunks", "2", "--work-dir",
                      str(root / "work"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    built = steps["tiny/mlx:evaluate"]["data"]
    # the same windows, the same cached reference, the same runtime: the same figures
    assert (result["ppl"], result["kld_mean"], result["top1"]) == (built["ppl"], built["kld_mean"], built["top1"])
    assert result["gate"] == "pass" and result["tokenizer"]["same"]


@pytest.mark.slow
def test_a_group_size_that_misfits_a_layer_fails_the_convert_naming_it(tmp_path, tiny_models):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    # hidden 64 (which group size 64 divides), but 4 heads of 24: o_proj reads 96 inputs, which it does not
    source = tmp_path / "odd-heads"
    tokenizer = tiny_models("llama")
    config = LlamaConfig(vocab_size=128257, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, source / name)
    (tmp_path / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out'}\n  evaluation: {ctx: 64, chunks: 2}\n"
        f"models:\n  - {{name: odd, source: {source}, formats: {{mlx: {{}}}}}}\n")
    proc = quantforge("build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"), "--json")
    assert proc.returncode != 0
    convert = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}["odd/mlx:convert"]
    assert convert["status"] == "failed"
    assert ("group_size 64 does not divide the input size 96 of model.layers.0.self_attn.o_proj: mlx-lm left "
            "them unquantized") in convert["error"]
    assert convert["hint"] == "formats.mlx.group_size: 32"
    assert not (tmp_path / "out").exists()  # nothing published


@pytest.mark.slow
@pytest.mark.noisy
def test_smollm2_at_8_bits_in_mlx_is_what_the_source_says(tmp_path, smollm2_checkpoint):
    # SmolLM2's rope_theta is 100000, nested under rope_parameters by transformers 5: were it not copied where
    # mlx-lm reads it, mlx-lm would run 10000 and KLD would be about 0.14 instead of about 0.001
    (tmp_path / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  evaluation: {ctx: 256, chunks: 1}\n"
        f"models:\n  - {{name: smol, source: {smollm2_checkpoint}, formats: {{mlx: {{bits: 8}}}}}}\n")
    proc = quantforge("build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
    assert steps["smol/mlx:convert"]["data"]["rope_patched"] == ["rope_theta"]
    config = json.loads((tmp_path / "out" / "t" / "smol-MLX-8bit" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    gate = steps["smol/mlx:gate"]["data"]
    assert gate["kld_mean"] < 0.01 and gate["top1"] > 0.9 and abs(gate["delta_ppl"]) < 0.02, gate
    assert gate["gate"]["passed"] and gate["tokenizer"]["same"] and gate["chat_template"]
