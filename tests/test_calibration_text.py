"""builtin:mix, the default calibration text: deterministic, holding the parts and scripts it declares, its chat
turns rendered with the model's own template, its make-up recorded and shown; a bad builtin name is a config error."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from quantforge.card import calibration_desc, calibration_text
from quantforge.config.schema import CalibrationSettings, EvaluationSettings
from quantforge.core.step import StepOutput
from quantforge.data import load_text, parse_text_source, text_digest
from quantforge.errors import ConfigError
from quantforge.formats.gguf import render_gguf_card
from quantforge.publish.record import step_record
from quantforge.text_mix import build_mix, makeup

PARTS = ("english", "languages", "code", "chat")


def _scripts(text: str) -> Counter:
    """Letters per Unicode script, by the first word of each character's name (CJK, CYRILLIC, ARABIC...)."""
    out: Counter = Counter()
    for ch in text:
        if ch.isalpha():
            out[unicodedata.name(ch, "UNKNOWN").split()[0]] += 1
    return out


@pytest.fixture(scope="module")
def mix():
    return build_mix()


def test_the_mix_is_the_same_text_every_time(mix):
    first = mix.text()
    build_mix.cache_clear()  # read again from the snapshot, not remembered
    again = build_mix()
    assert again.text() == first and text_digest(again.text()) == text_digest(first)
    # what the plan keys (load_text) is the same text, with the chat turns as plain text
    assert load_text(parse_text_source("builtin:mix")) == first
    assert "User: Tell me a programming joke in German.\nAssistant: " in first


def test_each_part_holds_what_it_declares(mix):
    by_part = {name: "".join(b.text for b in mix.blocks if b.part == name) for name in PARTS}
    assert [p.name for p in mix.parts] == list(PARTS)
    languages = _scripts(by_part["languages"])
    # the scripts the docs claim, each with a real amount of text (a sample is hundreds of letters)
    for script in ("LATIN", "CYRILLIC", "CJK", "ARABIC", "DEVANAGARI", "BENGALI", "TAMIL", "THAI", "HANGUL",
                   "ETHIOPIC", "GUJARATI", "HIRAGANA"):
        assert languages[script] >= 200, (script, languages.most_common())
    assert len(mix.parts[1].contents) == 40 and "en_Latn" not in mix.parts[1].contents
    english = _scripts(by_part["english"])
    assert english["LATIN"] > 0.99 * sum(english.values()) and "Everyone has the right" in by_part["english"]
    code = by_part["code"]
    markers = {"Python": "def __init__(", "C": "#define NPY_", "C++": "template <typename", "Fortran": "end subroutine"}
    assert set(mix.parts[2].contents) == set(markers)
    for language, marker in markers.items():
        assert marker in code, language
    chat = [b for b in mix.blocks if b.part == "chat"]
    assert chat and all(b.messages and b.messages[0][0] == "user" for b in chat)
    assert _scripts(by_part["chat"])["CYRILLIC"] > 1000  # the Russian jokes
    for info in mix.parts:
        assert info.origins and all(o.version and o.license for o in info.origins)


def test_every_stretch_of_the_mix_holds_every_part(mix):
    """Calibration windows come from the end of the text: the last quarter, and the last tenth, hold every part."""
    n = len(mix.blocks)
    for tail in (n // 4, n // 10):
        assert {b.part for b in mix.blocks[-tail:]} == set(PARTS)
    tail = "".join(b.text for b in mix.blocks[-n // 6:])
    for marker in ("def ", "#define NPY_", "template <", "subroutine"):  # every code language
        assert marker in tail, marker
    assert "Tell me a programming joke" in tail and "Quote the Universal Declaration" in tail


def test_makeup_counts_characters_and_tokens_per_part(mix):
    text = mix.text()
    plain = makeup(mix)
    assert sum(p["characters"] for p in plain) == len(text)
    assert abs(sum(p["characters_share"] for p in plain) - 1) < 1e-3
    assert all(p["characters_share"] > 0.05 for p in plain)
    tokens = [1] * len(mix.blocks)
    in_windows = [0] * (len(mix.blocks) - 10) + [1] * 10
    counted = makeup(mix, tokens, in_windows)
    assert sum(p["tokens"] for p in counted) == len(mix.blocks)
    assert sum(p["window_tokens"] for p in counted) == 10
    assert counted[0]["sources"][0] == {"package": "pyjokes", "version": counted[0]["sources"][0]["version"],
                                        "license": "BSD-3-Clause"}


def test_calibration_defaults_to_the_mix_and_evaluation_to_another_domain(mix):
    assert CalibrationSettings().dataset == "builtin:mix"
    assert EvaluationSettings().dataset == "builtin"
    docs = load_text(parse_text_source("builtin"))
    text = mix.text()
    # none of the documentation's paragraphs is in the mix (of some length, so not a stray common line)
    paragraphs = [p for p in docs.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 100 and not any(p in text for p in paragraphs[::25])


@pytest.mark.parametrize("spec, message", [
    ("builtin:mixx", "no builtin text 'mixx'; there are builtin (Python's documentation topics), builtin:mix"),
    ("builtin:", "no builtin text ''"),
])
def test_an_unknown_builtin_text_is_a_config_error_naming_the_key(write_targets, spec, message):
    from quantforge.config.loader import load_targets

    path = write_targets(f"""
        models:
          - name: m
            source: org/m
            calibration: {{dataset: '{spec}'}}
            formats: {{gguf: {{types: [Q4_K_M], imatrix: true}}}}
    """)
    with pytest.raises(ConfigError) as err:
        load_targets(path)
    text = str(err.value)
    assert "calibration.dataset" in text and message in text and "targets.yaml:4" in text


# ------------------------------------------------------------------------ chat template, calibration step

def _tokenizer_folder(converter, vocab: str, dest: Path) -> Path:
    """A checkpoint folder (no real weights) with a real family's tokenizer: qwen2's has a chat template,
    llama-bpe's (as llama.cpp ships it) has none."""
    from tiny_models import fake_checkpoint
    from transformers import AutoTokenizer

    fake_checkpoint(dest)
    AutoTokenizer.from_pretrained(converter.vocab_dir, gguf_file=vocab).save_pretrained(dest)
    return dest


@pytest.mark.slow  # the family tokenizers come with the converter's sdist
def test_chat_turns_go_through_the_models_template_when_it_has_one(tmp_path, converter, mix):
    from quantforge.toolchains.tokenizer_worker import render_chats

    conversations = mix.conversations()[:3]
    qwen = _tokenizer_folder(converter, "ggml-vocab-qwen2.gguf", tmp_path / "qwen2")
    texts, how = render_chats(qwen, conversations, tmp_path, tmp_path / "log")
    assert how == "the model's chat template" and len(texts) == 3
    for text, messages in zip(texts, conversations, strict=True):
        assert text.startswith("<|im_start|>")
        for m in messages:
            assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" in text
    llama = _tokenizer_folder(converter, "ggml-vocab-llama-bpe.gguf", tmp_path / "llama")
    assert render_chats(llama, conversations, tmp_path, tmp_path / "log") == (
        None, "plain turns (the model has no chat template)")


def _calibrate(tmp_path: Path, source: Path, samples: int = 32) -> dict:
    from quantforge.console import PlainReporter
    from quantforge.core.engine import run_plan
    from quantforge.core.plan import Plan, topological
    from quantforge.core.step import BuildOptions, PlanContext
    from quantforge.pipeline import build_plan, load_targets
    from quantforge.store import WorkDir

    root = tmp_path / "build"
    root.mkdir()
    (root / "targets.yaml").write_text(
        f"defaults:\n  calibration: {{samples: {samples}, seq_len: 256}}\n"
        f"models:\n  - {{name: m, source: {source}, formats: {{gguf: {{types: [Q4_K_M], imatrix: true}}}}}}\n")
    work = WorkDir(root / "work")
    plan = build_plan(load_targets(root / "targets.yaml"), PlanContext(work=work, offline=True))
    wanted = [s for s in plan.steps if s.kind in ("source", "calibration")]
    report = run_plan(Plan(plan.targets, topological(wanted)), work, BuildOptions(keep_going=True, offline=True),
                      PlainReporter(only_failures=True))
    [calibration] = [r for r in report.results if r.kind == "calibration"]
    assert calibration.status == "built", calibration
    output = StepOutput(Path(calibration.output_dir), json.loads((Path(calibration.output_dir) /
                                                                  "manifest.json").read_text()))
    return {"step": plan.steps, "output": output,
            "windows": np.load(Path(calibration.output_dir) / "calibration.npy")}


@pytest.mark.slow
def test_the_calibration_step_records_the_texts_makeup_and_sha256(tmp_path, converter, mix):
    from transformers import AutoTokenizer

    source = _tokenizer_folder(converter, "ggml-vocab-qwen2.gguf", tmp_path / "qwen2")
    got = _calibrate(tmp_path, source)
    output, windows = got["output"], got["windows"]
    [step] = [s for s in got["step"] if s.kind == "calibration"]
    assert step.params["dataset"] == "builtin:mix" and step.params["text_sha256"] == text_digest(mix.text())
    record = output.data["text"]
    assert record["chat"] == "the model's chat template"
    assert [p["name"] for p in record["parts"]] == list(PARTS)
    assert sum(p["window_tokens"] for p in record["parts"]) == windows.size == 32 * 256
    assert sum(p["tokens"] for p in record["parts"]) == record["tokens"] == output.data["text_tokens"]
    assert all(p["window_tokens"] > 0 for p in record["parts"])  # the windows hold every part
    # the sha256 is of the text as tokenized: the chat turns rendered through the template
    tokenizer = AutoTokenizer.from_pretrained(source)
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in mix.conversations()]
    assert record["sha256"] == text_digest(mix.text(rendered)) != text_digest(mix.text())
    ids = [i for t in mix.texts(rendered) for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert windows.reshape(-1).tolist() == ids[-windows.size:]  # qwen2 adds no BOS: the last ids, verbatim
    assert "<|im_start|>" in tokenizer.decode(windows.reshape(-1).tolist())
    # what cards and quantforge.json carry of it
    from quantforge.steps.calibration import calibration_settings

    settings = calibration_settings(output)
    assert settings["text"] == record and settings["dataset"] == "builtin:mix"
    assert step_record(output)["data"]["text"]["parts"] == record["parts"]


def test_the_card_shows_the_makeup(tmp_path):
    parts = [{"name": "english", "description": "English prose", "contents": ["English"],
              "sources": [{"package": "pyjokes", "version": "0.8.3", "license": "BSD-3-Clause"}],
              "characters": 100, "characters_share": 0.25, "tokens": 30, "tokens_share": 0.2, "window_tokens": 20,
              "window_share": 0.125},
             {"name": "code", "description": "source files", "contents": ["Python", "C"],
              "sources": [{"package": "numpy", "version": "2.2.6", "license": "BSD-3-Clause"}],
              "characters": 300, "characters_share": 0.75, "tokens": 120, "tokens_share": 0.8,
              "window_tokens": 140, "window_share": 0.875}]
    calibration = {"dataset": "builtin:mix", "samples": 16, "seq_len": 10,
                   "text": {"sha256": "f" * 64, "characters": 400, "tokens": 150, "chat": "the model's chat template",
                            "parts": parts}}
    assert calibration_desc(calibration) == ("`builtin:mix`, sha256 `ffffffffffff…`, 16 samples of 10 tokens; "
                                             "english 12.5%, code 87.5% (from the end of the text; evaluation "
                                             "windows come from its start)")
    src = tmp_path / "src"
    src.mkdir()
    source = StepOutput(src, {"params": {"source": "org/tiny", "files": {}}, "data": {"path": str(src),
                                                                                     "commit": "a" * 40}})
    quant = StepOutput(tmp_path, {"tools": {"libllama": "0.3.36"}, "data": {
        "file": "tiny-Q4_K_M.gguf", "size": 1000, "bits_per_weight": 4.5, "architecture": "llama", "fallbacks": [],
        "imatrix": {"tensors": 14, "unmapped": [], "calibration": calibration}}})
    gate = StepOutput(tmp_path, {"data": {"ppl": 10.0, "ppl_err": 0.1, "source_ppl": 9.0, "delta_ppl": 0.1,
                                          "kld_mean": 0.05, "top1": 0.9, "tokens_scored": 100}})
    text = render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                            artifacts={"Q4_K_M": (quant, gate)}, tokens=None)
    assert "computed on `builtin:mix`, sha256 `ffffffffffff…`" in text
    assert "Calibration text: <code>builtin:mix</code>" in text and f"`{'f' * 64}`" in text
    assert "| code | 87.5% | 75.0% | source files | Python, C | numpy 2.2.6 (BSD-3-Clause) |" in text
    assert "(chat turns: the model's chat template)" in text
    assert calibration_text({"dataset": "builtin", "samples": 1, "seq_len": 1,
                             "text": {"sha256": "0" * 64, "characters": 1, "tokens": 1}}) is None


def test_the_mix_is_read_from_quantforge_not_from_the_packages_it_quotes(monkeypatch, mix):
    """The text is part of every calibrated step's key: it must not move with the versions of the packages it was
    taken from (a nightly's plan job and its legs install different sets)."""
    import sys

    build_mix.cache_clear()
    for package in ("gflanguages", "pyjokes", "pybind11"):
        monkeypatch.setitem(sys.modules, package, None)  # what an import meets when it is not installed
    try:
        assert build_mix().text() == mix.text()
        assert text_digest(mix.text()).startswith("5eaf217e0b69")  # the committed snapshot's text
    finally:
        build_mix.cache_clear()
