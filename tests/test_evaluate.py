from __future__ import annotations

import numpy as np
import pytest

from quantforge import metrics
from quantforge.config.schema import EvaluationSettings
from quantforge.core.step import Step, StepContext, StepOutput
from quantforge.data import cut_windows, load_text, parse_text_source, resolve_paths
from quantforge.errors import BadInputError, GateFailed
from quantforge.steps.gate import gate_step, run_gate


@pytest.mark.parametrize(("spec", "kind"), [("builtin", "builtin"), ("file:a.txt,b.txt", "file"),
                                            ("hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text", "hf"),
                                            ("hf:org/ds::train:content", "hf")])
def test_text_source_specs(spec, kind):
    assert parse_text_source(spec).kind == kind


def test_hf_spec_fields():
    src = parse_text_source("hf:org/ds::train:content")
    assert (src.repo, src.config, src.split, src.column) == ("org/ds", None, "train", "content")


@pytest.mark.parametrize("spec", ["wikitext", "file:", "hf:org/ds:train", "hf:org/ds:cfg::text"])
def test_bad_text_source_specs(spec):
    with pytest.raises(ValueError, match="expected"):
        parse_text_source(spec)


def test_file_sources_resolve_relative_to_the_targets_file(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    src = resolve_paths(parse_text_source("file:a.txt, b.txt"), tmp_path)
    assert load_text(src) == "alpha\n\nbeta"
    with pytest.raises(BadInputError, match=r"missing\.txt"):
        load_text(resolve_paths(parse_text_source("file:missing.txt"), tmp_path))


def test_builtin_text_is_offline_and_large_enough():
    text = load_text(parse_text_source("builtin"))
    assert len(text) > 300_000 and text == load_text(parse_text_source("builtin"))


def test_windows_start_with_bos_and_refuse_short_text():
    ids = list(range(100, 200))
    w = cut_windows(ids, 16, 4, bos_id=1)
    assert w.shape == (4, 16) and (w[:, 0] == 1).all() and w[1, 1] == 117
    assert (cut_windows(ids, 16, 4, bos_id=None)[:, 0] == [100, 116, 132, 148]).all()
    with pytest.raises(BadInputError, match="needs 2000"):
        cut_windows(ids, 100, 20, bos_id=1)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    window = np.arange(32) % 50
    ref = metrics.score_window(np.zeros((32, 50), np.float32), window, k=8)
    assert len(ref.nll) == 15  # positions 16..30 predict tokens 17..31
    assert metrics.perplexity(ref.nll)[0] == pytest.approx(50.0, rel=1e-5)


def test_identical_model_has_zero_kld_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 100)).astype(np.float32) * 3
    window = rng.integers(0, 100, 64)
    ref = metrics.score_window(logits, window)
    comparison = metrics.Comparison([], [], [])
    comparison.add_window(logits, window, ref)
    summary = metrics.summarize(comparison, ref)
    assert summary["delta_ppl"] == pytest.approx(0.0, abs=1e-6)
    assert summary["kld_mean"] == pytest.approx(0.0, abs=1e-6) and summary["top1"] == 1.0


def test_topk_kld_is_a_tight_lower_bound_of_the_exact_kld():
    rng = np.random.default_rng(1)
    p_logits = rng.normal(size=(64, 200)).astype(np.float32) * 4
    q_logits = p_logits + rng.normal(size=p_logits.shape).astype(np.float32) * 0.3
    window = rng.integers(0, 200, 64)
    lp, lq = metrics.log_softmax(p_logits[32:-1]).astype(np.float64), metrics.log_softmax(q_logits[32:-1])
    exact = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    comparison = metrics.Comparison([], [], [])
    ref = metrics.score_window(p_logits, window, k=32)
    comparison.add_window(q_logits, window, ref)
    approx = metrics.summarize(comparison, ref)["kld_mean"]
    assert approx <= exact + 1e-6 and approx == pytest.approx(exact, rel=0.1)
    full = metrics.Comparison([], [], [])
    full.add_window(q_logits, window, metrics.score_window(p_logits, window, k=200))
    assert float(np.concatenate(full.kld).mean()) == pytest.approx(exact, rel=1e-4)


def test_tokenizer_parity_names_the_first_differing_span():
    same = metrics.tokenizer_parity([1, 2, 3], [1, 2, 3], str)
    assert same == {"same": True, "ids": 3}
    diff = metrics.tokenizer_parity([1, 2, 3, 4], [1, 2, 9, 9, 4], lambda t: f"<{t}>")
    assert not diff["same"]
    assert diff["first_difference"] == "at token 2: source ['<2>', '<3>', '<4>'] vs artifact " \
                                       "['<2>', '<9>', '<9>', '<4>'] (4 vs 5 ids)"


def test_sample_parity_reads_the_sample_the_source_was_tokenized_on(tmp_path):
    import json

    sample = tmp_path / "tokenizer_sample.json"
    sample.write_text(json.dumps({"text": "ab c", "ids": [97, 98, 32, 99]}))
    assert metrics.sample_parity(sample, lambda text: [ord(c) for c in text], chr) == {"same": True, "ids": 4}
    differs = metrics.sample_parity(sample, lambda text: [ord(c) for c in text.replace(" ", "")], chr)
    assert differs["first_difference"] == "at token 2: source ['b', ' ', 'c'] vs artifact ['b', 'c'] (4 vs 3 ids)"


# ------------------------------------------------------------------------------------------------ gates

def test_gate_limits_most_specific_wins():
    s = EvaluationSettings(max_ppl_increase={"gguf": 0.2, "gguf/q4_k_m": 0.1})
    assert s.gate("max_ppl_increase", "gguf", "Q4_K_M", 0.5) == 0.1
    assert s.gate("max_ppl_increase", "gguf", "Q8_0", 0.02) == 0.2
    assert EvaluationSettings().gate("max_ppl_increase", "gguf", "Q8_0", 0.02) == 0.02
    assert EvaluationSettings().gate("max_kld", "gguf", "Q8_0", None) is None


@pytest.mark.parametrize(("gates", "message"), [({"gguf/Q4_K_MM": 0.1}, "did you mean 'Q4_K_M'"),
                                                ({"exl2": 0.1}, "unknown format 'exl2'"),
                                                ({"gptq/4bit": 0.1}, "gptq makes one checkpoint"),
                                                ({"gguf": -1}, "must be >= 0")])
def test_bad_gate_keys_are_rejected(gates, message):
    with pytest.raises(ValueError, match=message):
        EvaluationSettings(max_ppl_increase=gates)


def _gate(tmp_path, evaluation: dict, enforce: bool = True, **limits):
    settings = EvaluationSettings(**limits)
    ev, check = Step("gguf.evaluate", "e", {}), Step("gguf.verify", "v", {})
    step = gate_step("m/gguf/Q4_K_M:gate", "gguf", "Q4_K_M", ev, check, settings, 0.15, enforce, "m")
    ctx = StepContext(step, tmp_path, tmp_path / "log", {"evaluation": StepOutput(tmp_path, {"data": evaluation}),
                                                         "check": StepOutput(tmp_path, {"data": {}})}, None)
    return run_gate(step, ctx)


MEASURED = {"ppl": 12.0, "source_ppl": 10.0, "delta_ppl": 0.2, "kld_mean": 0.05,
            "tokenizer": {"same": True}, "chat_template_missing": False}


def test_gate_failure_says_which_gate_and_by_how_much(tmp_path):
    with pytest.raises(GateFailed, match=r"gate gguf/Q4_K_M failed: ΔPPL \+20\.00% exceeds max_ppl_increase "
                                         r"15\.00% \(PPL 12\.000 vs source 10\.000\)"):
        _gate(tmp_path, MEASURED)
    assert _gate(tmp_path, MEASURED, max_ppl_increase={"gguf": 0.25})["gate"]["passed"]
    with pytest.raises(GateFailed, match=r"KLD 0\.0500 exceeds max_kld 0\.0100"):
        _gate(tmp_path, MEASURED, max_ppl_increase={"gguf": 0.25}, max_kld={"gguf/Q4_K_M": 0.01})


def test_tokenizer_and_chat_template_gates(tmp_path):
    bad_tok = {**MEASURED, "delta_ppl": 0.0, "tokenizer": {"same": False, "first_difference": "at token 3: ..."}}
    with pytest.raises(GateFailed, match="tokenizer differs from the source's: at token 3"):
        _gate(tmp_path, bad_tok)
    assert _gate(tmp_path, bad_tok, tokenizer_check=False)["gate"]["passed"]
    with pytest.raises(GateFailed, match="chat template"):
        _gate(tmp_path, {**MEASURED, "delta_ppl": 0.0, "chat_template_missing": True})


def test_no_gate_records_what_would_have_failed(tmp_path):
    result = _gate(tmp_path, MEASURED, enforce=False)
    assert result["gate"]["enforced"] is False and result["gate"]["passed"] is False
    assert "ΔPPL +20.00%" in result["gate"]["problems"][0]
