from __future__ import annotations

from huggingface_hub import ModelCard

from quantforge.core.step import StepOutput
from quantforge.formats.gguf import render_gguf_card

SHA = "a" * 40


def _outputs(tmp_path, *, hub: bool):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# Tiny\n\nA small model.\n")
    (src_dir / "chat_template.jinja").write_text("{{ messages }}")
    params = {"source": "org/tiny", "files": {"model.safetensors": "e" * 64}} if hub else \
        {"source": str(src_dir), "digest": "d" * 64}
    source = StepOutput(src_dir, {"params": params, "data": {"path": str(src_dir), **({"commit": SHA} if hub else {})}})
    tokens = StepOutput(tmp_path, {"params": {"dataset": "builtin", "ctx": 512, "chunks": 32}})

    def artifact(qtype: str, size: int, delta: float, fallbacks: int):
        quant = StepOutput(tmp_path, {"tools": {"libllama": "0.3.36"}, "data": {
            "file": f"tiny-{qtype}.gguf", "size": size, "bits_per_weight": size * 8 / 1e9, "architecture": "llama",
            "converter": "llama-cpp-python==0.3.36",
            "fallbacks": [{"wanted": "q4_K", "used": "q5_0"}] * fallbacks}})
        gate = StepOutput(tmp_path, {"data": {"ppl": 10 * (1 + delta), "ppl_err": 0.5, "source_ppl": 10.0,
                                              "delta_ppl": delta, "kld_mean": delta / 2, "top1": 1 - delta,
                                              "tokens_scored": 8160}})
        return quant, gate

    artifacts = {"Q8_0": artifact("Q8_0", 8_000_000_000, 0.004, 0), "Q4_K_M": artifact("Q4_K_M", 4_500_000_000,
                                                                                       0.04, 3)}
    return source, tokens, artifacts


def test_card_for_a_hub_source(tmp_path):
    source, tokens, artifacts = _outputs(tmp_path, hub=True)
    text = render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                            artifacts=artifacts, tokens=tokens)
    card = ModelCard(text)
    assert card.data.base_model == "org/tiny" and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0" and card.data.library_name == "gguf"
    assert card.data.quantized_by == "acme" and {"gguf", "llama"} <= set(card.data.tags)
    assert "| [tiny-Q4_K_M.gguf](./tiny-Q4_K_M.gguf) | Q4_K_M | 4.50 GB | 36.00 | 10.400 ± 0.500 | +4.00% | " \
           "0.0200 | 96.0% | - | 3 tensors fell back |" in text
    assert "at commit `" + SHA + "`" in text and "[org/tiny](https://huggingface.co/org/tiny)" in text
    assert "llama-cli -hf acme/tiny-GGUF:Q4_K_M" in text and "ollama run hf.co/acme/tiny-GGUF:Q4_K_M" in text
    assert "lms get https://huggingface.co/acme/tiny-GGUF@Q4_K_M" in text
    assert 'hf download acme/tiny-GGUF --include "*-Q4_K_M.gguf" --local-dir .' in text
    assert "| ⭐ | [tiny-Q4_K_M.gguf](./tiny-Q4_K_M.gguf) |" in text  # the recommended default, marked
    assert "```jinja\n{{ messages }}\n```" in text  # the prompt format, verbatim
    assert "3× q4_K→q5_0" in text
    assert "A small model." in text  # the source card is quoted, not dropped
    # smallest first in "which file?"
    assert text.index("about **5.67 GB** of memory: `tiny-Q4_K_M.gguf`") < text.index("`tiny-Q8_0.gguf` (Q8_0")


def test_card_for_a_local_source_names_no_base_model(tmp_path):
    source, tokens, artifacts = _outputs(tmp_path, hub=False)
    card = ModelCard(render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                                      artifacts=artifacts, tokens=tokens))
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "local checkpoint `tiny` (content digest `dddddddddddddddd`)" in card.text
