"""The FP8 repo's model card: the checkpoint and its measurements, which GPUs run it natively, how to serve it
with vLLM and load it in transformers, and where it came from."""

from __future__ import annotations

from ..card import eval_desc, hub_url, measured, render_card
from ..core.formats import CardInputs, format_named
from ..figures import format_size

CARD_TEMPLATE = "fp8_card.md.jinja"

# What runs an FP8 checkpoint, and how (vLLM's compressed-tensors support; NVIDIA's compute capabilities)
HARDWARE = (
    "**W8A8, natively** (FP8 tensor cores, compute capability 8.9 and up): Ada Lovelace (L4, L40S, RTX 4090 and "
    "the RTX 40 series), Hopper (H100, H200), Blackwell (B200, GB200, RTX 50 series). About half the memory of "
    "16-bit weights and faster matrix multiplications.",
    "**Weight-only** on Ampere (A100: 8.0; A10, A40, RTX 30 series: 8.6): vLLM's Marlin FP8 kernel keeps the "
    "weights in FP8 and computes in 16 bits. Half the weight memory, no FP8 arithmetic.",
    "Older GPUs (Turing, Volta) and CPUs: no FP8 kernels in vLLM. transformers still loads the checkpoint and "
    "decompresses it (as measured here), without the savings.",
)


def render_fp8_card(card: CardInputs) -> str:
    built = card.artifacts[0]
    q, g = built.output.data, built.gate.data
    arch = q.get("architecture")
    settings_model = format_named("fp8").settings
    settings = settings_model.model_validate({k: q[k] for k in settings_model.model_fields if k in q})
    gguf_repo = dict(card.release.siblings).get("gguf")
    return render_card(
        CARD_TEMPLATE, card.source, card.namespace, "transformers",
        {"fp8", "compressed-tensors", "vllm", "8-bit", *([arch] if arch else [])}, card.release,
        repo_id=card.repo_id, model=card.model, settings=", ".join(settings.card_settings()),
        ignored=", ".join(f"`{name}`" for name in q.get("ignored", [])) or "none",
        size=format_size(q["size"]), **measured(q, g),
        source_ppl=f"{g['source_ppl']:.3f}" if "source_ppl" in g else "-",
        tokens_scored=g.get("tokens_scored", 0), eval_desc=eval_desc(card.tokens), eval_dtype=g.get("dtype", "?"),
        eval_device=g.get("device", "?"), hardware=list(HARDWARE), source_dtype=q.get("dtype", "?"),
        gguf=f"[{gguf_repo}]({hub_url(gguf_repo)})" if gguf_repo else "a GGUF build of the model",
        quantize_seconds=f"{q.get('quantize_seconds', 0) + q.get('save_seconds', 0):.0f}",
        compressed_tensors=built.output.tools.get("compressed-tensors", "?"),
    )
