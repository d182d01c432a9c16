"""GGUF variants (issue 21): recipes in targets.yaml, their checks against a model's tensors, the dominance gate
against the stock frontier, and the card's quality-per-byte section. The build at the end is the real thing: a
tiny model quantized with a pattern recipe and a `_L` variant, read back with the project's header reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_card import _outputs
from tiny_models import fake_checkpoint

from quantforge.core.step import PlanContext, StepOutput
from quantforge.errors import ConfigError, ToolchainError
from quantforge.formats.gguf import render_gguf_card
from quantforge.formats.gguf_chart import render_chart
from quantforge.formats.gguf_frontier import Point, dominance, frontier
from quantforge.formats.gguf_recipes import (
    BUILTIN_VARIANTS,
    KV_MAX,
    Recipe,
    RecipeMismatch,
    Tensor,
    applied,
    check_tensors,
)
from quantforge.pipeline import build_plan, load_targets
from quantforge.store import WorkDir

TARGETS = """
defaults:
  publish: {{to: "dir:./out", namespace: t}}
models:
  - name: m
    source: ./src
    formats:
      gguf:
        imatrix: true
        types: {types}
{variants}
"""


def targets(write_targets, tmp_path, types: str, variants: str = "") -> Path:
    fake_checkpoint(tmp_path / "src")
    body = f"        variants:\n{variants}" if variants else ""
    return write_targets(TARGETS.format(types=types, variants=body))


def config_errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_targets(path)
    return [str(issue) for issue in info.value.issues]


# ------------------------------------------------------------------------------------------ targets.yaml

def test_variants_declared_and_builtin_become_recipes(write_targets, tmp_path):
    path = targets(write_targets, tmp_path, "[Q4_K_M, q8_0, q4_k_l]",
                   "          Q4_K_XL: {base: q4_k_m, output: q8_0, embeddings: Q6_K,\n"
                   "                    tensors: {'blk\\.[0-3]\\.ffn_down': Q6_K, 'attn_v': q5_k}}\n")
    gguf = load_targets(path).models[0].formats.settings("gguf")
    assert gguf.names() == ["Q4_K_M", "Q8_0", "Q4_K_L", "Q4_K_XL"]  # a declared variant is made: no need to list it
    assert gguf.recipe("Q8_0") is None
    assert gguf.recipe("Q4_K_L") == Recipe("Q4_K_L", "Q4_K_M", "Q8_0", "Q8_0")
    assert gguf.recipe("Q4_K_XL") == Recipe("Q4_K_XL", "Q4_K_M", "Q8_0", "Q6_K",
                                            (("blk\\.[0-3]\\.ffn_down", "Q6_K"), ("attn_v", "Q5_K")))


@pytest.mark.parametrize(("variants", "fragment"), [
    ("Q4_K_XL: {base: Q4_K_M, output: Q4_K_M}", "Q4_K_M is a file type (a mix of tensor types), not a tensor type; "
                                                "did you mean 'Q4_K'?"),
    ("Q4_K_XL: {base: Q4_K_M, tensors: {ffn_down: Q6K}}", "unknown tensor type 'Q6K'; did you mean 'Q6_K'?"),
    ("Q4_K_XL: {base: Q4_K_MM, output: Q8_0}", "unknown GGUF type 'Q4_K_MM'; did you mean 'Q4_K_M'?"),
    ("Q4_K_XL: {base: Q4_K_M, output: Q8_0, embedings: Q8_0}", "unknown key 'embedings'; did you mean 'embeddings'?"),
    ("Q4_K_M: {base: Q4_K_M, output: Q8_0}", "Q4_K_M is a stock llama.cpp type: give the variant a name of its own"),
    ("Q4_K_L: {base: Q4_K_M, output: Q6_K}", "Q4_K_L is a builtin variant (Q4_K_M + output Q8_0, embeddings Q8_0)"),
    ("Q4_K_M2: {base: Q4_K_M, output: Q8_0}", "name a variant by a tensor type and capital letters"),
    ("Q4_K_XL: {base: Q4_K_M}", "sets no tensor type: it would be Q4_K_M itself"),
    ("Q4_K_XL: {base: Q4_K_M, tensors: {'BLK\\.0': Q6_K}}", "write patterns in lower case"),
    ("Q4_K_XL: {base: Q4_K_M, tensors: {'(?P<n>ffn)': Q6_K}}", "no other (?…) group"),
    ("Q4_K_XL: {base: Q4_K_M, tensors: {'ffn[': Q6_K}}", "is not a regular expression"),
    ("Q4_K_XL: {base: Q4_K_M, tensors: {'ffn=': Q6_K}}", "a pattern cannot hold '='"),
    (f"Q4_K_XL: {{base: Q4_K_M, tensors: {{'{'a' * KV_MAX}': Q6_K}}}}", "at most 122 bytes"),
    ("Q4_K_XL: {base: F16, tensors: {ffn: Q6_K}}", "llama.cpp applies patterns only on a quantized base"),
], ids=lambda v: v[:40])
def test_a_bad_variant_is_named_with_what_to_write(write_targets, tmp_path, variants, fragment):
    name = variants.split(":")[0]
    path = targets(write_targets, tmp_path, "[Q4_K_M]", f"          {variants}\n")
    errors = config_errors(path)
    assert any(fragment in e and f"formats.gguf.variants.{name}" in e for e in errors), errors


def test_a_build_of_variants_alone_has_no_frontier_to_beat(write_targets, tmp_path):
    path = targets(write_targets, tmp_path, "[Q4_K_L]", "          Q4_K_XL: {base: Q4_K_M, output: Q8_0}\n")
    assert any("list at least one stock type in types (e.g. Q4_K_M)" in e for e in config_errors(path))
    path = targets(write_targets, tmp_path, "[Q4_K_M, Q4_K_XX]")  # types hold stock and builtin names only
    assert any("formats.gguf.types[1]" in e and "'Q4_K_L'" in e for e in config_errors(path))
    path = targets(write_targets, tmp_path, "[Q4_K_M, q4_k_xl]", "          Q4_K_XL: {base: Q4_K_M, output: Q8_0}\n")
    assert any("types: Q4_K_XL is declared under variants, which makes it: leave it out of types" in e
               for e in config_errors(path))


def test_a_variant_with_iquant_tensors_needs_the_importance_matrix(write_targets, tmp_path):
    path = targets(write_targets, tmp_path, "[Q4_K_M]",
                   "          Q4_K_XS: {base: Q4_K_M, tensors: {ffn_up: IQ2_XS}}\n")
    path.write_text(path.read_text().replace("imatrix: true", "imatrix: false"))
    assert any("Q4_K_XS needs an importance matrix: add imatrix: true" in e for e in config_errors(path))


def test_gate_keys_accept_builtin_variant_names(write_targets, tmp_path):
    path = targets(write_targets, tmp_path, "[Q4_K_M, Q4_K_L]")
    path.write_text(path.read_text() + "    evaluation: {max_kld: {gguf/q4_k_l: 0.05}}\n")
    assert load_targets(path).models[0].evaluation.max_kld == {"gguf/Q4_K_L": 0.05}


# ------------------------------------------------------------------------------------------------ plan keys

def plan(path: Path, tmp_path: Path, enforce: bool = True) -> dict[str, object]:
    context = PlanContext(work=WorkDir(tmp_path / "work"), offline=True, enforce_gates=enforce)
    return {s.label: s for s in build_plan(load_targets(path), context).steps}


def test_a_variant_adds_its_own_steps_and_leaves_stock_keys_alone(write_targets, tmp_path):
    stock = plan(targets(write_targets, tmp_path, "[Q4_K_M, Q8_0]"), tmp_path)
    both = plan(targets(write_targets, tmp_path, "[Q4_K_M, Q8_0, Q4_K_L]"), tmp_path)
    changed = {label for label, step in both.items() if label not in stock or stock[label].key != step.key}
    assert changed == {f"m/gguf/Q4_K_L:{k}" for k in ("quantize", "verify", "evaluate", "gate")} | {"m/gguf:publish"}
    # a stock type's parameters are what they were before recipes existed: its key has not moved
    assert set(both["m/gguf/Q4_K_M:quantize"].params) == {"type", "file", "metadata"}
    variant = both["m/gguf/Q4_K_L:quantize"]
    assert variant.params["type"] == "Q4_K_M" and variant.params["file"] == "m-Q4_K_L.gguf"
    assert variant.params["recipe"] == {"name": "Q4_K_L", "base": "Q4_K_M", "output": "Q8_0", "embeddings": "Q8_0"}
    assert json.loads(variant.params["metadata"]["quantforge.recipe"])["base"] == "Q4_K_M"
    assert "imatrix" in variant.inputs  # weighted like its base
    gate = both["m/gguf/Q4_K_L:gate"]
    assert gate.kind == "gguf.variant_gate" and gate.params["stock"] == ["Q4_K_M", "Q8_0"]
    assert gate.data_only == frozenset(gate.inputs)  # the stock figures are read as data
    assert gate.params["max_ppl_increase"] == both["m/gguf/Q4_K_M:gate"].params["max_ppl_increase"]


def test_the_order_of_patterns_is_part_of_the_key(write_targets, tmp_path):
    """The first pattern that matches wins, so two orders are two recipes."""
    def key(rules: str) -> str:
        path = targets(write_targets, tmp_path, "[Q4_K_M]",
                       f"          Q4_K_XL: {{base: Q4_K_M, tensors: {{{rules}}}}}\n")
        return plan(path, tmp_path)["m/gguf/Q4_K_XL:quantize"].key

    assert key("'blk\\.0\\.': Q8_0, 'ffn': Q6_K") != key("'ffn': Q6_K, 'blk\\.0\\.': Q8_0")


# ---------------------------------------------------------------------------------------- the model's tensors

TENSORS = [Tensor("token_embd.weight", 576), Tensor("output.weight", 576),
           *(Tensor(f"blk.{i}.{n}.weight", c) for i in range(4) for n, c in
             (("attn_q", 576), ("attn_v", 576), ("ffn_up", 576), ("ffn_down", 1536)))]
NAMES = [t.name for t in TENSORS]


def test_a_pattern_that_matches_no_tensor_names_itself_the_key_and_what_exists():
    recipe = Recipe("Q4_K_XL", "Q4_K_M", tensors=(("blk\\.[0-3]\\.ffn_down", "Q6_K"), ("blk\\.9\\.", "Q8_0")))
    with pytest.raises(RecipeMismatch) as info:
        check_tensors(recipe, TENSORS, "m: formats.gguf.variants.Q4_K_XL")
    message = str(info.value)
    assert message.startswith("m: formats.gguf.variants.Q4_K_XL.tensors: 'blk\\\\.9\\\\.' matches no tensor")
    assert "blk.0.attn_q.weight" in message and "layers blk.0–blk.3" in message


def test_a_pattern_shadowed_by_an_earlier_rule_is_refused():
    recipe = Recipe("Q4_K_XL", "Q4_K_M", embeddings="Q8_0", tensors=(("ffn", "Q6_K"), ("ffn_up", "Q8_0")))
    with pytest.raises(RecipeMismatch, match="'ffn_up' matches only tensors that 'ffn' already sets"):
        check_tensors(recipe, TENSORS, "m: formats.gguf.variants.Q4_K_XL")
    with pytest.raises(RecipeMismatch, match="matches only tensors that 'embeddings' already sets"):
        check_tensors(Recipe("Q4_K_XL", "Q4_K_M", embeddings="Q8_0", tensors=(("token_embd", "Q6_K"),)), TENSORS, "x")


def test_an_output_type_whose_blocks_do_not_fit_the_rows_is_refused():
    """llama.cpp falls back for a pattern's type, not for the output and embedding types."""
    with pytest.raises(RecipeMismatch, match=r"x.output: Q6_K stores rows in blocks of 256, and output.weight has "
                                             "rows of 576"):
        check_tensors(Recipe("Q4_K_XL", "Q4_K_M", output="Q6_K"), TENSORS, "x")
    check_tensors(Recipe("Q4_K_XL", "Q4_K_M", output="Q8_0", embeddings="Q4_0"), TENSORS, "x")


def test_what_each_rule_set_is_read_back_with_llama_cpp_precedence():
    recipe = Recipe("Q4_K_XL", "Q4_K_M", output="Q8_0", tensors=(("ffn_down", "Q6_K"), ("blk\\.0\\.", "Q8_0")))
    types = {n: "Q4_K" for n in NAMES} | {"output.weight": "Q8_0", "token_embd.weight": "Q6_K"}
    types |= {f"blk.{i}.ffn_down.weight": "Q6_K" for i in range(4)}
    types |= {n: "Q8_0" for n in NAMES if n.startswith("blk.0.") and "ffn_down" not in n}
    record = applied(recipe, TENSORS, types, [])
    rules = {r["rule"]: r for r in record["applied"]}
    assert rules["output"]["tensors"] == {"output.weight": "Q8_0"}
    assert set(rules["ffn_down"]["tensors"]) == {f"blk.{i}.ffn_down.weight" for i in range(4)}
    # blk.0.ffn_down is the first pattern's: the second decides the rest of layer 0 only
    assert set(rules["blk\\.0\\."]["tensors"]) == {"blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_up.weight"}
    # a fallback llama.cpp logged is recorded, not an error; a tensor it silently left alone is one
    fell = applied(recipe, TENSORS, types | {"blk.1.ffn_down.weight": "Q8_0"},
                   [{"tensor": "blk.1.ffn_down.weight", "wanted": "q6_K", "used": "q8_0"}])
    assert fell["fallbacks"] == {"blk.1.ffn_down.weight": "Q8_0"}
    with pytest.raises(ToolchainError, match=r"blk\.2\.ffn_down\.weight is Q4_K, not Q6_K"):
        applied(recipe, TENSORS, types | {"blk.2.ffn_down.weight": "Q4_K"}, [])


def test_tied_embeddings_take_the_output_type():
    tied = [t for t in TENSORS if t.name != "output.weight"]
    types = {t.name: "Q4_K" for t in tied} | {"token_embd.weight": "Q8_0"}
    record = applied(Recipe("Q4_K_XL", "Q4_K_M", output="Q8_0"), tied, types, [])
    assert record["applied"] == [{"rule": "output", "type": "Q8_0", "tensors": {"token_embd.weight": "Q8_0"}}]


def test_the_recipe_in_the_file_and_on_the_command_line():
    recipe = Recipe("Q4_K_XL", "Q4_K_M", "Q8_0", None, (("blk\\.[0-3]\\.ffn_down", "Q6_K"), ("attn_v", "Q5_K")))
    kv = recipe.metadata()
    assert json.loads(kv["quantforge.recipe"]) == {"name": "Q4_K_XL", "base": "Q4_K_M", "output": "Q8_0",
                                                   "tensor_types": 2}
    assert kv["quantforge.recipe.tensor_type.0"] == "blk\\.[0-3]\\.ffn_down=Q6_K"
    assert all(len(v.encode()) <= KV_MAX for v in kv.values())
    assert recipe.command("m-F16.gguf", "m-Q4_K_XL.gguf", "m-imatrix.gguf") == (
        "llama-quantize --imatrix m-imatrix.gguf --output-tensor-type q8_0 --tensor-type "
        "'blk\\.[0-3]\\.ffn_down=q6_k' --tensor-type attn_v=q5_k m-F16.gguf m-Q4_K_XL.gguf Q4_K_M")
    longest = Recipe("IQ4_XS_" + "X" * 17, "IQ4_XS", "IQ3_XXS", "IQ3_XXS", (("a", "Q8_0"),) * 99)
    assert len(longest.metadata()["quantforge.recipe"].encode()) <= KV_MAX
    assert set(BUILTIN_VARIANTS) == {"Q2_K_L", "Q3_K_XL", "Q4_K_L", "Q5_K_L", "Q6_K_L"}


def test_the_worker_builds_llama_quantizes_override_array():
    import llama_cpp

    from quantforge.toolchains.llamacpp_worker import ggml_type, tensor_override_array

    array, patterns = tensor_override_array(["blk\\.0\\.=q8_0", "a=b=Q6_K"])
    assert [array[0].pattern, array[1].pattern, array[2].pattern] == [b"blk\\.0\\.", b"a=b", None]
    assert [array[0].type, array[1].type] == [llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q6_K]
    assert array[2].type == llama_cpp.GGML_TYPE_COUNT and patterns == [b"blk\\.0\\.", b"a=b"]
    assert ggml_type("bf16") == 30
    with pytest.raises(ValueError, match="unknown ggml tensor type 'Q4_K_M'"):
        ggml_type("Q4_K_M")


# ---------------------------------------------------------------------------------------- the dominance gate

STOCK = [Point("Q3_K_M", 88_000_000, 0.09), Point("Q4_0", 92_000_000, 0.118), Point("Q4_K_M", 105_000_000, 0.025),
         Point("Q8_0", 145_000_000, 0.0033)]


def test_the_frontier_drops_files_a_smaller_one_beats():
    assert [p.name for p in frontier(STOCK)] == ["Q3_K_M", "Q4_K_M", "Q8_0"]  # Q4_0: larger and worse than Q3_K_M


def test_a_variant_must_beat_the_interpolated_frontier_at_its_size():
    good = dominance(Point("Q4_K_L", 115_000_000, 0.012), STOCK)
    assert good.passed and good.below.name == "Q4_K_M" and good.above.name == "Q8_0"
    assert good.frontier_kld == pytest.approx(0.025 + (0.0033 - 0.025) * 10 / 40)
    bad = dominance(Point("Q4_K_X", 110_000_000, 0.05), STOCK)
    assert not bad.passed
    assert bad.problem.startswith("mean KLD 0.0500 is not below the stock frontier's 0.0223 at its size (110 MB; "
                                  "interpolated between Q4_K_M (105 MB, KLD 0.0250) and Q8_0 (145 MB, KLD 0.0033))")
    # between Q3_K_M and Q4_K_M, Q4_0 is no part of the line: it would have made the bar easier
    assert dominance(Point("Q3_K_X", 92_000_000, 0.08), STOCK).frontier_kld == pytest.approx(0.09 - 0.065 * 4 / 17)


def test_beyond_the_stock_files():
    larger = dominance(Point("Q8_0_L", 160_000_000, 0.004), STOCK)
    assert not larger.passed and "the largest stock file, Q8_0 (145 MB, KLD 0.0033)" in larger.problem
    smaller = dominance(Point("Q2_K_L", 70_000_000, 0.5), STOCK)
    assert smaller.passed and smaller.frontier_kld is None and smaller.below is None
    same = dominance(Point("Q4_K_Y", 105_000_000, 0.025), STOCK)
    assert not same.passed and same.frontier_kld == 0.025  # a tie is not a win


# ------------------------------------------------------------------------------------------------------ card

def _with_variant(tmp_path):
    source, tokens, artifacts = _outputs(tmp_path, hub=True)
    quant = StepOutput(tmp_path, {"tools": {"libllama": "0.3.36"}, "data": {
        "file": "tiny-Q4_K_XL.gguf", "size": 5_000_000_000, "bits_per_weight": 40.0, "imatrix": {"tensors": 4},
        "recipe": {"name": "Q4_K_XL", "base": "Q4_K_M", "output": "Q8_0", "tensors": [["ffn_(up|down)", "Q6_K"]],
                   "applied": [{"rule": "output", "type": "Q8_0", "tensors": {"output.weight": "Q8_0"}},
                               {"rule": "ffn_(up|down)", "type": "Q6_K",
                                "tensors": {f"blk.{i}.ffn_down.weight": "Q6_K" for i in range(6)}}]}}})
    frontier_kld = 0.02 + (0.002 - 0.02) * 0.5 / 3.5
    gate = StepOutput(tmp_path, {"data": {
        "ppl": 10.3, "ppl_err": 0.5, "source_ppl": 10.0, "delta_ppl": 0.03, "kld_mean": 0.012, "top1": 0.97,
        "tokens_scored": 8160, "gate": {"passed": True, "enforced": True, "problems": []},
        "frontier": {"passed": True, "frontier_kld": frontier_kld, "problem": None,
                     "below": {"name": "Q4_K_M", "size": 4_500_000_000, "kld": 0.02},
                     "above": {"name": "Q8_0", "size": 8_000_000_000, "kld": 0.002}}}})
    return source, tokens, {**artifacts, "Q4_K_XL": (quant, gate)}


def test_the_card_shows_each_variant_its_recipe_and_the_chart(tmp_path):
    source, tokens, artifacts = _with_variant(tmp_path)
    text = render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                            artifacts=artifacts, tokens=tokens)
    ModelCard(text)  # still a valid card
    assert "| variant of Q4_K_M ([recipe](#quality-per-byte)); importance matrix |" in text
    assert "![Mean KL divergence from the source against file size](./kld-vs-size.png)" in text
    assert "| Q4_K_XL | Q4_K_M + output Q8_0, 1 pattern | 5.00 GB | 0.0120 | 0.0174 (Q4_K_M – Q8_0) | -31% |" in text
    assert "<summary>Q4_K_XL: recipe and command line</summary>" in text
    assert "- `ffn_(up|down)` → Q6_K: 6 tensors (blk.0.ffn_down.weight, blk.1.ffn_down.weight" in text
    assert ("llama-quantize --imatrix tiny-imatrix.gguf --output-tensor-type q8_0 --tensor-type "
            "'ffn_(up|down)=q6_k' tiny-F16.gguf tiny-Q4_K_XL.gguf Q4_K_M") not in text  # no matrix file published
    assert "llama-quantize --output-tensor-type q8_0 --tensor-type 'ffn_(up|down)=q6_k' tiny-F16.gguf " \
           "tiny-Q4_K_XL.gguf Q4_K_M" in text
    assert "`ollama run hf.co/acme/tiny-GGUF:Q4_K_XL`" in text
    stock_only = render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                                  artifacts={k: v for k, v in artifacts.items() if k != "Q4_K_XL"}, tokens=tokens)
    assert "Quality per byte" not in stock_only and "variant" not in stock_only


def test_the_chart_is_a_png_with_the_same_bytes_for_the_same_figures(tmp_path):
    variants = [Point("Q4_K_L", 115_000_000, 0.012)]
    first = render_chart(STOCK, variants, tmp_path / "a.png", "m")
    second = render_chart(STOCK, variants, tmp_path / "b.png", "m")
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.read_bytes() == second.read_bytes()
    # drawn without a display: no pyplot, whatever backend the environment asks for
    code = ("import sys, pathlib; from quantforge.formats.gguf_chart import render_chart; "
            "from quantforge.formats.gguf_frontier import Point; "
            "render_chart([Point('a', 1, 0.1), Point('b', 2, 0.01)], [], pathlib.Path(sys.argv[1]), 't'); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.png")], capture_output=True, text=True,
                          env={"MPLBACKEND": "TkAgg", "DISPLAY": "", "PATH": "",
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ a real build

BUILD = r"""
defaults:
  publish: {to: 'dir:./out', namespace: t}
  # random weights: near-uniform distributions, KLDs of 1e-6; only the mechanics and the worst variant tell
  evaluation: {ctx: 64, chunks: 4, tokenizer_check: false, max_ppl_increase: {gguf: 0.5}}
models:
  - name: tiny
    source: SOURCE
    formats:
      gguf:
        types: [Q4_K_M, Q8_0, Q4_K_L]
        variants:
          Q4_K_XL: {base: Q4_K_M, output: Q8_0, tensors: {'blk\.0\.ffn_down': Q6_K, 'attn_v': Q8_0}}
          Q8_0_BAD: {base: Q8_0, tensors: {'ffn_(up|gate|down)': Q2_K}}
"""


def quantforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def recipe_build(tmp_path_factory, tiny_models):
    """A tiny Mistral with its own output head and 256-wide rows (K-quants fit: no fallbacks), built with two
    stock types, a builtin `_L` variant, a pattern recipe and a deliberately bad variant, gates not enforced."""
    root = tmp_path_factory.mktemp("recipes")
    (root / "targets.yaml").write_text(BUILD.replace("SOURCE", str(tiny_models("mistral", hidden=256, tied=False))))
    proc = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--no-gate", "--json")
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.mark.slow
def test_every_override_is_in_the_file_with_the_recipe(recipe_build):
    from quantforge.toolchains.gguf_header import read_header

    repo = recipe_build / "out" / "t" / "tiny-GGUF"

    def types_and_keys(name: str) -> tuple[dict[str, str], dict[str, object]]:
        header = read_header(repo / f"tiny-{name}.gguf")
        return {t.name: t.type_name for t in header.tensors}, header.metadata

    stock, stock_kv = types_and_keys("Q4_K_M")
    pattern, kv = types_and_keys("Q4_K_XL")
    layers = sorted({n.split(".")[1] for n in pattern if n.startswith("blk.")})
    assert layers == ["0", "1"]
    assert pattern["output.weight"] == "Q8_0" and pattern["blk.0.ffn_down.weight"] == "Q6_K"
    assert all(pattern[f"blk.{i}.attn_v.weight"] == "Q8_0" for i in layers)
    # the overrides changed what the stock mix gives those tensors; the kinds no rule names keep the stock mix
    # (llama.cpp counts a kind's layers by the tensors its mix decided, so an override shifts the rest of its kind)
    assert stock["output.weight"] != "Q8_0" and stock["blk.0.ffn_down.weight"] != "Q6_K"
    untouched = [n for n in stock if not any(k in n for k in ("output.weight", "ffn_down", "attn_v"))]
    assert len(untouched) > 10 and all(pattern[n] == stock[n] for n in untouched)
    assert json.loads(kv["quantforge.recipe"]) == {"name": "Q4_K_XL", "base": "Q4_K_M", "output": "Q8_0",
                                                   "tensor_types": 2}
    assert kv["quantforge.recipe.tensor_type.0"] == "blk\\.0\\.ffn_down=Q6_K"
    assert kv["quantforge.recipe.tensor_type.1"] == "attn_v=Q8_0"
    assert not any(k.startswith("quantforge.recipe") for k in stock_kv)

    builtin, builtin_kv = types_and_keys("Q4_K_L")
    assert builtin["output.weight"] == "Q8_0" and builtin["token_embd.weight"] == "Q8_0"
    assert stock["token_embd.weight"] != "Q8_0"
    assert json.loads(builtin_kv["quantforge.recipe"])["embeddings"] == "Q8_0"

    # the record says the same as the file
    manifest = json.loads((repo / "quantforge.json").read_text())
    record = manifest["artifacts"]["Q4_K_XL"]["artifact"]["recipe"]
    assert {n: t for rule in record["applied"] for n, t in rule["tensors"].items()} == \
        {"output.weight": "Q8_0", "blk.0.ffn_down.weight": "Q6_K",
         **{f"blk.{i}.attn_v.weight": "Q8_0" for i in layers}}
    assert "recipe" not in manifest["artifacts"]["Q4_K_M"]["artifact"]
    # the card: the chart in the repo, a row and a recipe per variant
    assert (repo / "kld-vs-size.png").read_bytes()[:4] == b"\x89PNG"
    assert manifest["repo_files"]["kld-vs-size.png"]["points"]["Q4_K_L"]["variant"] is True
    card = (repo / "README.md").read_text()
    assert "![Mean KL divergence from the source against file size](./kld-vs-size.png)" in card
    assert "llama-quantize --output-tensor-type q8_0 --tensor-type 'blk\\.0\\.ffn_down=q6_k' --tensor-type " \
           "attn_v=q8_0 tiny-F16.gguf tiny-Q4_K_XL.gguf Q4_K_M" in card
    assert card.count("<summary>") >= 3 and "`ollama run hf.co/t/tiny-GGUF:Q4_K_L`" in card


@pytest.mark.slow
def test_a_variant_worse_than_the_stock_frontier_fails_its_gate_with_both_klds(recipe_build, tmp_path):
    from quantforge.formats.gguf_frontier import format_kld

    root = recipe_build
    manifest = json.loads((root / "out" / "t" / "tiny-GGUF" / "quantforge.json").read_text())
    figures = {name: (a["artifact"]["size"], a["check"]["kld_mean"]) for name, a in manifest["artifacts"].items()}
    (s1, k1), (s2, k2), (size, kld) = figures["Q4_K_M"], figures["Q8_0"], figures["Q8_0_BAD"]
    assert s1 < size < s2  # Q2_K feed-forward layers on Q8_0: between the two stock files in size
    expected = k1 + (k2 - k1) * (size - s1) / (s2 - s1)
    assert kld > expected
    # --no-gate published it and recorded the miss
    recorded = manifest["artifacts"]["Q8_0_BAD"]["check"]["gate"]
    assert recorded["enforced"] is False and recorded["passed"] is False
    # enforced: only the gates run again (the stock figures are read as data), and this one fails
    text = (root / "targets.yaml").read_text().replace("dir:./out", f"dir:{tmp_path / 'out'}")
    (root / "strict.yaml").write_text(text)
    proc = quantforge("build", str(root / "strict.yaml"), "--work-dir", str(root / "work"), "--keep-going")
    assert proc.returncode == 1
    assert (f"gate gguf/Q8_0_BAD failed: mean KLD {format_kld(kld)} is not below the stock frontier's "
            f"{format_kld(expected)} at its size") in proc.stderr
    assert "interpolated between Q4_K_M" in proc.stderr
    assert not (tmp_path / "out").exists()
    latest = json.loads((root / "work" / "reports" / "latest.json").read_text())
    ran = {s["kind"] for s in latest["steps"] if s["status"] not in ("reused", "not-run", "skipped")}
    assert ran <= {"gate", "gguf.variant_gate"}, ran


@pytest.mark.slow
def test_a_pattern_that_matches_no_tensor_stops_before_quantizing(recipe_build):
    root = recipe_build
    typo = "          Q4_K_XX: {base: Q4_K_M, tensors: {'blk\\.9\\.ffn': Q6_K}}\n"
    text = (root / "targets.yaml").read_text().replace("          Q8_0_BAD:", typo + "          Q8_0_BAD:")
    (root / "typo.yaml").write_text(text)
    proc = quantforge("build", str(root / "typo.yaml"), "--work-dir", str(root / "work"), "--no-gate")
    assert proc.returncode == 1
    assert ("tiny: formats.gguf.variants.Q4_K_XX.tensors: 'blk\\\\.9\\\\.ffn' matches no tensor llama.cpp quantizes in "
            "this model (it has blk.0.attn_k.weight") in proc.stderr
    assert "layers blk.0–blk.1" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((root / "work").rglob("tiny-Q4_K_XX.gguf"))
