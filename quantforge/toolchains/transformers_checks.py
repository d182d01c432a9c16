"""The checks of a checkpoint that transformers runs, shared by every worker that loads one (GPTQModel's, and any
other whose checkpoints transformers reads): greedy generation from a prompt, and the harness's figures on the
evaluation windows. Called in the worker's process, with the model the worker loaded its own way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .worker import report_progress


def generate(model, checkpoint: Path, prompt: str, n_tokens: int, trust_remote_code: bool = False) -> dict[str, Any]:
    """Greedily continue `prompt` for up to `n_tokens` tokens with the checkpoint's own tokenizer; fails on
    non-finite logits."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=trust_remote_code)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    prompt_tokens = int(ids.shape[1])
    generated: list[int] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(n_tokens):
            logits = model(ids).logits[0, -1].float()
            if not torch.isfinite(logits).all():
                return {"ok": False, "error": f"non-finite logits after {len(generated)} generated tokens"}
            token = int(logits.argmax())
            generated.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    seconds = time.perf_counter() - started
    return {"ok": True, "prompt_tokens": prompt_tokens, "generated_ids": generated,
            "generated_text": tokenizer.decode(generated), "device": str(model.device),
            "tokens_per_second": round(len(generated) / seconds, 2)}


def evaluate(model, checkpoint: Path, windows_file: Path, reference_file: Path, sample_file: Path | None,
             trust_remote_code: bool = False) -> dict[str, Any]:
    """Score the model on the harness's windows (the same token ids the source model saw), its tokenizer on the
    sample text against the source's, and whether the checkpoint carries a chat template."""
    import torch
    from transformers import AutoTokenizer

    from quantforge import metrics
    from quantforge.chat_template import has_chat_template

    windows = np.load(windows_file)
    reference = metrics.Reference.load(reference_file)
    comparison = metrics.Comparison([], [], [])
    started = time.perf_counter()
    with torch.inference_mode():
        for i, window in enumerate(windows):
            ids = torch.from_numpy(window[None, :].astype(np.int64)).to(model.device)
            logits = model(ids).logits[0].float().cpu().numpy()
            comparison.add_window(logits, window, reference)
            report_progress(f"window {i + 1}/{len(windows)}")
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"ok": True, **metrics.summarize(comparison, reference), "seconds": round(seconds, 3),
                              "tokens_per_second": round(windows.size / seconds, 1)}
    if sample_file:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), trust_remote_code=trust_remote_code)
        result["tokenizer"] = metrics.sample_parity(
            sample_file, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            lambda t: tokenizer.decode([t]))
    result["chat_template"] = has_chat_template(checkpoint)
    return result
