"""GPTQ and AWQ through GPTQModel, and the importance matrix for GGUF, on tiny Llama and Qwen2 models (CPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantforge.data import cut_calibration
from quantforge.errors import BadInputError, IncompatibleShapes
from quantforge.toolchains.gguf_header import read_header
from quantforge.toolchains.gptqmodel import check_shapes
from quantforge.toolchains.worker import _report_latest

FAMILIES = ("llama", "qwen2")


def quantforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def calibrated_build(tmp_path_factory, tiny_models):
    """One build: GPTQ and AWQ for both families, and Q4_K_M of the tiny Llama with and without an imatrix."""
    root = tmp_path_factory.mktemp("calibrated")
    sources = {f: tiny_models(f, hidden=128) for f in FAMILIES}
    # 256-wide rows fit K-quant and i-quant blocks: the imatrix acts on real Q4_K and IQ2_XXS, not on fallbacks
    sources["llama-256"] = tiny_models("llama", hidden=256)
    models = "".join(f"  - {{name: tiny-{f}, source: {sources[f]}, formats: {{gptq: {{group_size: 32}}, "
                     f"awq: {{group_size: 32}}}}}}\n" for f in FAMILIES)
    models += (f"  - {{name: imatrix, source: {sources['llama-256']}, formats: {{gguf: {{types: [Q4_K_M, "
               "IQ2_XXS], imatrix: true}}}\n"
               f"  - {{name: plain, source: {sources['llama-256']}, formats: {{gguf: {{types: [Q4_K_M]}}}}}}\n")
    # random weights: near-uniform predictions, so only the mechanics are measured, with loose gates
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: t}\n  calibration: {samples: 8, seq_len: 64}\n"
        "  evaluation: {ctx: 64, chunks: 4,\n"
        "               max_ppl_increase: {gguf: 0.5, gguf/IQ2_XXS: 5, gptq: 0.5, awq: 0.5}}\n"
        f"models:\n{models}")
    proc = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
    return root, steps, sources


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_is_written_in_the_classic_layout_and_loads_in_transformers(calibrated_build, family, method):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, steps, sources = calibrated_build
    repo = root / "out" / "t" / f"tiny-{family}-{method.upper()}"
    config = json.loads((repo / "config.json").read_text())["quantization_config"]
    saved = json.loads((repo / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["desc_act"]) == (4, 32, False)
    assert (saved["bits"], saved["group_size"]) == (4, 32)
    if method == "gptq":
        assert (config["quant_method"], config["checkpoint_format"], config["sym"]) == ("gptq", "gptq", True)
        assert (saved["quant_method"], saved["checkpoint_format"], saved["sym"]) == ("gptq", "gptq", True)
    else:
        assert (config["quant_method"], config["version"], config["zero_point"]) == ("awq", "gemm", True)
    assert "offload_to_disk_path" not in (repo / "config.json").read_text()  # no local paths published
    assert not list(Path.cwd().glob(f"logs/{method}_log_*.log"))  # GPTQModel's own logs stay in the work dir
    with safe_open(repo / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names if n.endswith(".scales")} == {"F16"}
        g_idx = [f.get_tensor(n) for n in names if n.endswith(".g_idx")]
    if method == "gptq":  # desc_act false: groups in column order, as every GPTQ runtime expects
        assert g_idx and all(torch.equal(g, torch.arange(len(g)) // 32) for g in g_idx)
    # the tokenizer and generation config are the source's, byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (repo / name).read_bytes() == (sources[family] / name).read_bytes(), name

    verify = steps[f"tiny-{family}/{method}:verify"]["data"]
    assert 1 <= len(verify["generated_ids"]) <= 8
    assert verify["kernels"] == (["TorchAtenLinear"] if method == "gptq" else ["TorchAtenAwqLinear"])
    evaluation = steps[f"tiny-{family}/{method}:gate"]["data"]
    assert evaluation["tokens_scored"] == 4 * 31 and evaluation["tokenizer"]["same"]
    assert evaluation["gate"]["passed"] and evaluation["sample"] == verify["generated_text"]

    # and independently of quantforge's worker: transformers loads the published folder and generates
    model = AutoModelForCausalLM.from_pretrained(repo)
    assert any(hasattr(m, "qweight") for m in model.modules())
    tokenizer = AutoTokenizer.from_pretrained(repo)
    out = model.generate(**tokenizer("The capital of France is", return_tensors="pt"), max_new_tokens=4,
                         do_sample=False)
    assert out.shape[1] > tokenizer("The capital of France is", return_tensors="pt").input_ids.shape[1]

    card = (repo / "README.md").read_text()
    assert "library_name: transformers" in card and f"- {method}" in card
    assert f"--quantize {method}" in card and "samples of 64 tokens" in card
    manifest = json.loads((repo / "quantforge.json").read_text())
    assert manifest["artifacts"][method]["artifact"]["calibration"]["samples"] == 8


@pytest.mark.slow
def test_quantforge_eval_scores_a_checkpoint_folder_like_the_build(calibrated_build):
    root, steps, sources = calibrated_build
    repo = root / "out" / "t" / "tiny-qwen2-AWQ"
    proc = quantforge("eval", str(repo), "--source", str(sources["qwen2"]), "--ctx", "64", "--chunks", "4",
                      "--work-dir", str(root / "work"), "--json", "--max-ppl-increase", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    built = steps["tiny-qwen2/awq:evaluate"]["data"]
    # the same windows, the same cached reference, the same runtime: the same figures
    assert (result["ppl"], result["kld_mean"], result["top1"]) == (built["ppl"], built["kld_mean"], built["top1"])
    assert result["gate"] == "pass" and result["tokenizer"]["same"]
    bad = quantforge("eval", str(sources["qwen2"]), "--source", str(sources["qwen2"]), "--work-dir",
                     str(root / "work"))
    assert bad.returncode == 2 and "not an artifact of a format quantforge builds" in bad.stderr
    assert "gptq, awq" in bad.stderr


@pytest.mark.slow
def test_imatrix_is_computed_once_mapped_to_every_tensor_and_changes_the_quantization(calibrated_build):
    root, steps, sources = calibrated_build
    imatrix_step = steps["imatrix/gguf:imatrix"]
    layers = json.loads((sources["llama-256"] / "config.json").read_text())["num_hidden_layers"]
    assert imatrix_step["data"]["entries"] == 7 * layers  # q, k, v, o, gate, up, down per layer; not the head
    assert imatrix_step["data"]["tokens"] == 8 * 64
    with np.load(Path(imatrix_step["output_dir"]) / "imatrix.npz") as matrix:
        q = matrix["model.layers.0.self_attn.q_proj"]
        down = matrix["model.layers.0.mlp.down_proj"]
        assert q.shape == (256,) and down.shape == (512,) and (q > 0).all() and np.isfinite(down).all()

    with_matrix = steps["imatrix/gguf/Q4_K_M:quantize"]["data"]
    without = steps["plain/gguf/Q4_K_M:quantize"]["data"]
    calibration = with_matrix["imatrix"]["calibration"]
    assert with_matrix["imatrix"] == {"tensors": 7 * layers, "unmapped": [], "calibration": calibration}
    # the default text, builtin:mix: its make-up and sha256 follow the matrix into the quantize step's record
    text = steps["imatrix:calibration"]["data"]["text"]
    assert calibration == {"dataset": "builtin:mix", "samples": 8, "seq_len": 64, "text": text}
    assert [p["name"] for p in text["parts"]] == ["english", "languages", "code", "chat"]
    assert text["chat"] == "plain turns (the model has no chat template)"  # llama.cpp's llama-bpe vocab has none
    assert sum(p["window_tokens"] for p in text["parts"]) == 8 * 64
    assert without["imatrix"] is None
    log = Path(steps["imatrix/gguf/Q4_K_M:quantize"]["log"]).read_text()
    assert f"have importance matrix data with {7 * layers} entries" in log
    # same types, different quantized weights where the matrix applies; the embeddings (no entry) are identical
    assert with_matrix["tensor_types"] == without["tensor_types"]
    files = [root / "out" / "t" / f"{m}-GGUF" / f"{m}-Q4_K_M.gguf" for m in ("imatrix", "plain")]
    a, b = (read_header(f).tensor_bytes(f) for f in files)
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]
    assert a["blk.1.ffn_down.weight"] != b["blk.1.ffn_down.weight"]
    assert a["token_embd.weight"] == b["token_embd.weight"]
    cards = [(root / "out" / "t" / f"{m}-GGUF" / "README.md").read_text() for m in ("imatrix", "plain")]
    assert (f"Importance matrix: Q4_K_M, IQ2_XXS were quantized with one, covering {7 * layers} weight matrices, "
            f"computed on `builtin:mix`, sha256 `{text['sha256'][:12]}…`, 8 samples of 64 tokens") in cards[0]
    assert "Calibration text: <code>builtin:mix</code>" in cards[0] and "gflanguages" in cards[0]
    record = json.loads((root / "out" / "t" / "imatrix-GGUF" / "quantforge.json").read_text())
    # quantforge.json carries the make-up (it writes keys sorted)
    assert json.dumps(text["parts"], sort_keys=True) in json.dumps(record, sort_keys=True)
    assert "Importance matrix" not in cards[1]
    # a type llama.cpp refuses to make without a matrix: made with it, as IQ2_XXS proper (rows of 256)
    iq2 = steps["imatrix/gguf/IQ2_XXS:quantize"]["data"]
    assert iq2["tensor_types"]["blk.0.attn_q.weight"] == "IQ2_XXS" and iq2["imatrix"]["tensors"] == 7 * layers
    assert with_matrix["tensor_types"]["blk.0.attn_q.weight"] == "Q4_K" and not with_matrix["fallbacks"]
    # the two models share the source, calibration and conversion by key: those ran once
    assert steps["plain/gguf:convert"]["status"] == "reused"


@pytest.mark.slow
def test_bad_group_size_fails_that_target_with_the_layer_and_the_sizes_that_work(tmp_path, tiny_models):
    # hidden 96: a group of 64 fits under it but divides no layer that reads it; AWQ cannot take 96 outputs
    source = tiny_models("llama", hidden=96)
    (tmp_path / "t.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out'}\n  calibration: {samples: 2, seq_len: 32}\n"
        "  evaluation: {ctx: 64, chunks: 2}\n"
        f"models:\n  - {{name: m, source: {source}, formats: {{gptq: {{group_size: 64}}, awq: {{group_size: 32}}}}}}\n")
    proc = quantforge("build", str(tmp_path / "t.yaml"), "--work-dir", str(tmp_path / "work"), "--json",
                      "--keep-going")
    assert proc.returncode == 1
    steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
    gptq = steps["m/gptq:quantize"]
    assert gptq["status"] == "failed"
    assert re.fullmatch(r"group_size 64 does not divide the input size 96 of model\.layers\.0\.self_attn\.q_proj"
                        r" and \d+ more layers", gptq["error"])
    assert gptq["hint"] == "group sizes that divide every layer: 16, 32, -1"
    awq = steps["m/awq:quantize"]
    assert awq["status"] == "failed" and "multiples of 64; model.layers.0.self_attn.q_proj has 96" in awq["error"]
    assert not (tmp_path / "out").exists()
    assert "group_size 64" in proc.stderr and "hint: group sizes" in proc.stderr


def test_shape_check_accepts_what_divides():
    layers = {"a": (576, 192), "b": (1536, 576)}  # SmolLM2's shapes: 576 = 9 x 64
    check_shapes("gptq", 64, layers)
    check_shapes("gptq", -1, layers)
    check_shapes("awq", 64, layers)
    with pytest.raises(IncompatibleShapes, match=r"input size 576 of a$") as err:
        check_shapes("gptq", 128, layers)
    assert err.value.hint == "group sizes that divide every layer: 16, 32, 64, -1"
    with pytest.raises(IncompatibleShapes) as err:
        check_shapes("awq", 128, layers)
    assert err.value.hint == "group sizes that divide every layer: 16, 32, 64"  # AWQ has no -1
    with pytest.raises(IncompatibleShapes, match="b has 96"):
        check_shapes("awq", 32, {"b": (1536, 96)})


def test_progress_comes_from_the_newest_matching_line(tmp_path):
    from quantforge.toolchains.gptqmodel import _LAYER
    from quantforge.toolchains.worker import _OWN_PROGRESS

    watched = [(_OWN_PROGRESS, lambda m: m["text"]), (_LAYER, lambda m: f"layer {int(m[1]) + 1}/{int(m[2]) + 1}")]
    log = tmp_path / "step.log"
    log.write_text("noise\nQuantizing layer 2 of 29 [bar]\rQuantizing layer 3 of 29\nquantforge-progress: window 1/8\n"
                   "Quantizing layer 4 of 2")  # the last line is still being written
    seen: list[str] = []
    offset = _report_latest(log, 0, watched, seen.append)
    assert seen == ["window 1/8"] and offset == len(log.read_bytes()) - len("Quantizing layer 4 of 2")
    with open(log, "a") as f:
        f.write("9\n")
    assert _report_latest(log, offset, watched, seen.append) == len(log.read_bytes())
    assert seen == ["window 1/8", "layer 5/30"]


# ------------------------------------------------------------------------------------- calibration windows

def test_calibration_takes_the_last_ids_and_refuses_a_text_too_short():
    ids = list(range(100, 150))  # 50 ids
    windows, first = cut_calibration(ids, seq_len=8, samples=3, bos_id=None)
    assert first == 26 and windows.tolist() == [ids[26:34], ids[34:42], ids[42:50]]
    with_bos, _ = cut_calibration(ids, seq_len=8, samples=3, bos_id=1)  # the tokenizer adds one: it leads each
    assert with_bos.tolist() == [[1, *ids[27:34]], [1, *ids[35:42]], [1, *ids[43:50]]]
    with pytest.raises(BadInputError, match=r"^calibration text has 50 tokens; samples 7 x seq_len 8 needs 56: "
                                            r"lower samples or add text$"):
        cut_calibration(ids, seq_len=8, samples=7, bos_id=None)
    # the evaluation's windows take the first 24: 24 + 3 x 8 fit in 50, 30 + 3 x 8 do not
    assert cut_calibration(ids, seq_len=8, samples=3, bos_id=None, after=24)[1] == 26
    with pytest.raises(BadInputError, match=r"needs 24 after the 30 the evaluation windows take \(ctx x chunks\): "
                                            r"lower samples or chunks, add text, or calibrate on another text"):
        cut_calibration(ids, seq_len=8, samples=3, bos_id=None, after=30)


def _tokenizer_source(dest: Path) -> Path:
    """A checkpoint folder with a BPE tokenizer that adds BOS (as Llama's does), trained here; nothing builds it."""
    from tiny_models import fake_checkpoint
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fake_checkpoint(dest)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_line(i) for i in range(0, 3000, 7)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(dest)
    return dest


def _line(i: int) -> str:
    return f"entry {i:05d} says {'abcdefghij'[i % 10]}{'klmnop'[i % 6]} to {i * 7 % 1000:03d}.\n"


def _windows(tmp_path: Path, lines: int, name: str) -> dict:
    """The evaluation and calibration steps of a plan whose one text serves both, run: their windows and results."""
    from quantforge.console import PlainReporter
    from quantforge.core.engine import run_plan
    from quantforge.core.plan import Plan, topological
    from quantforge.core.step import BuildOptions, PlanContext
    from quantforge.pipeline import build_plan, load_targets
    from quantforge.store import WorkDir

    root = tmp_path / name
    root.mkdir()
    (root / "text.txt").write_text("".join(_line(i) for i in range(lines)))
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out'}\n  evaluation: {dataset: 'file:text.txt', ctx: 32, chunks: 4}\n"
        "  calibration: {dataset: 'file:./text.txt', samples: 3, seq_len: 32}\n"
        f"models:\n  - {{name: m, source: {tmp_path / 'src'}, "
        "formats: {gguf: {types: [Q4_K_M], imatrix: true}}}\n")
    work = WorkDir(root / "work")
    plan = build_plan(load_targets(root / "targets.yaml"), PlanContext(work=work, offline=True))
    wanted = [s for s in plan.steps if s.kind in ("source", "eval.tokens", "calibration")]
    report = run_plan(Plan(plan.targets, topological(wanted)), work, BuildOptions(keep_going=True, offline=True),
                      PlainReporter(only_failures=True))
    out = {}
    for result in report.results:
        out[result.kind] = result
        if result.status == "built" and result.kind in ("eval.tokens", "calibration"):
            file = "windows.npy" if result.kind == "eval.tokens" else "calibration.npy"
            out[result.kind + ".npy"] = np.load(Path(result.output_dir) / file)
    return out


def test_one_text_for_evaluation_and_calibration_shares_no_token_position(tmp_path):
    from tokenizers import Tokenizer

    source = _tokenizer_source(tmp_path / "src")
    got = _windows(tmp_path, 60, "long")
    evaluation, calibration = got["eval.tokens.npy"], got["calibration.npy"]
    assert evaluation.shape == (4, 32) and calibration.shape == (3, 32)
    # where each window sits in the text, found by its ids under the tokenizer itself (not from the steps' records)
    text = (tmp_path / "long" / "text.txt").read_text()
    ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert len(ids) > 4 * 32 + 3 * 32

    def position(window: np.ndarray) -> int:
        body = window[1:].tolist()  # the first id is BOS, which the text does not hold there
        found = [i for i in range(1, len(ids) - 30) if ids[i:i + 31] == body]
        assert len(found) == 1, found
        return found[0] - 1

    assert {int(w[0]) for w in (*evaluation, *calibration)} == {1}  # BOS leads every window: the tokenizer adds it
    eval_at = [position(w) for w in evaluation]
    calib_at = [position(w) for w in calibration]
    assert eval_at == [0, 32, 64, 96]  # from the start
    assert calib_at == [len(ids) - 96, len(ids) - 64, len(ids) - 32]  # the last samples x seq_len ids
    eval_positions = {p for start in eval_at for p in range(start, start + 32)}
    calib_positions = {p for start in calib_at for p in range(start, start + 32)}
    assert not eval_positions & calib_positions

    # a text too short to keep them apart is refused, with what it takes; the evaluation alone still fits
    short = _windows(tmp_path, 18, "short")
    assert short["eval.tokens"].status == "built" and short["calibration"].status == "failed"
    assert re.fullmatch(r"calibration text has \d+ tokens; samples 3 x seq_len 32 needs 96 after the 128 the "
                        r"evaluation windows take \(ctx x chunks\): lower samples or chunks, add text, or calibrate "
                        r"on another text", short["calibration"].error)
