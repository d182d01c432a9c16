"""Quality metrics on identical token windows, in numpy, shared by the torch reference and every runtime.

Scoring follows llama.cpp's perplexity tool: each window is scored on its second half (the first half is
context), so figures are comparable with published ones. The reference distribution is kept compactly as its
top-k log-probabilities per scored position; KL divergence lumps the rest of the vocabulary into one "tail"
bucket, a tight lower bound of the full KL that costs k values instead of a vocabulary per position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 32


def first_scored(ctx: int) -> int:
    return ctx // 2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    # float32 with float64 sums: exact enough for KLD down to ~1e-6, and half the time and memory of float64
    shifted = logits.astype(np.float32, copy=True)
    shifted -= shifted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    shifted -= log_norm
    return shifted


@dataclass
class Reference:
    """What the source model said at every scored position of every window."""

    nll: np.ndarray  # [n] negative log-likelihood of the true next token
    top_ids: np.ndarray  # [n, k] int32, the reference's k most likely tokens, most likely first
    top_logprobs: np.ndarray  # [n, k] float32

    def save(self, path) -> None:
        np.savez_compressed(path, nll=self.nll, top_ids=self.top_ids, top_logprobs=self.top_logprobs)

    @classmethod
    def load(cls, path) -> Reference:
        with np.load(path) as z:
            return cls(z["nll"], z["top_ids"], z["top_logprobs"])


def score_window(logits: np.ndarray, window: np.ndarray, k: int = TOP_K) -> Reference:
    """Scored positions of one window: logits[j] predicts window[j + 1] for j in [ctx/2, ctx - 1)."""
    first = first_scored(len(window))
    logprobs = log_softmax(logits[first:-1])
    targets = window[first + 1:]
    nll = -logprobs[np.arange(len(targets)), targets].astype(np.float64)
    k = min(k, logprobs.shape[-1])
    top_ids = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]  # O(vocab), then order just those k
    order = np.argsort(-np.take_along_axis(logprobs, top_ids, axis=-1), axis=-1)
    top_ids = np.take_along_axis(top_ids, order, axis=-1).astype(np.int32)
    top_logprobs = np.take_along_axis(logprobs, top_ids, axis=-1).astype(np.float32)
    return Reference(nll, top_ids, top_logprobs)


def concat(parts: list[Reference]) -> Reference:
    return Reference(np.concatenate([p.nll for p in parts]), np.concatenate([p.top_ids for p in parts]),
                     np.concatenate([p.top_logprobs for p in parts]))


@dataclass
class Comparison:
    """An artifact's scored positions next to the reference's."""

    nll: list[np.ndarray]
    kld: list[np.ndarray]
    top1_same: list[np.ndarray]

    def add_window(self, logits: np.ndarray, window: np.ndarray, ref: Reference) -> None:
        """Score one window's logits ([len(window), vocab]); windows are added in the reference's order."""
        offset = sum(len(scored) for scored in self.nll)
        first = first_scored(len(window))
        logprobs = log_softmax(logits[first:-1])
        n = len(logprobs)
        targets = window[first + 1:]
        self.nll.append(-logprobs[np.arange(n), targets].astype(np.float64))
        ids = ref.top_ids[offset:offset + n]
        p_log = ref.top_logprobs[offset:offset + n].astype(np.float64)
        q_log = np.take_along_axis(logprobs, ids, axis=-1).astype(np.float64)
        p = np.exp(p_log)
        p_tail = np.clip(1.0 - p.sum(axis=-1), 1e-12, None)
        q_tail = np.clip(1.0 - np.exp(q_log).sum(axis=-1), 1e-12, None)
        kld = (p * (p_log - q_log)).sum(axis=-1) + p_tail * (np.log(p_tail) - np.log(q_tail))
        self.kld.append(np.maximum(kld, 0.0))
        self.top1_same.append(logprobs.argmax(axis=-1) == ids[:, 0])


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """PPL and its standard error (as llama.cpp's perplexity tool estimates it)."""
    mean = float(np.mean(nll))
    ppl = float(np.exp(mean))
    err = float(ppl * np.std(nll, ddof=1) / np.sqrt(len(nll))) if len(nll) > 1 else 0.0
    return ppl, err


def summarize(comparison: Comparison, ref: Reference) -> dict[str, float | int]:
    nll = np.concatenate(comparison.nll)
    kld = np.concatenate(comparison.kld)
    same = np.concatenate(comparison.top1_same)
    ppl, err = perplexity(nll)
    ref_ppl, _ = perplexity(ref.nll[:len(nll)])
    with np.errstate(all="ignore"):
        figures = {
            "ppl": round(ppl, 4),
            "ppl_err": round(err, 4),
            "source_ppl": round(ref_ppl, 4),
            "delta_ppl": round(ppl / ref_ppl - 1.0, 6),
            "kld_mean": round(float(kld.mean()), 6),
            "kld_p99": round(float(np.percentile(kld, 99)), 6),
            "top1": round(float(same.mean()), 6),
        }
    # NaN/inf (garbage logits) become None: manifests and --json stay valid JSON, and the gate refuses them
    return {**{k: (v if math.isfinite(v) else None) for k, v in figures.items()}, "tokens_scored": len(nll)}


def tokenizer_parity(expected: list[int], got: list[int], decode: Callable[[int], str]) -> dict[str, object]:
    """Compare two tokenizations of one text; describe the first differing span."""
    if expected == got:
        return {"same": True, "ids": len(expected)}
    i = next((k for k, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    span = slice(max(0, i - 1), i + 4)
    return {
        "same": False,
        "ids": len(expected),
        "artifact_ids": len(got),
        "first_difference": f"at token {i}: source {[decode(t) for t in expected[span]]} vs artifact "
                            f"{[decode(t) for t in got[span]]} ({len(expected)} vs {len(got)} ids)",
    }


def sample_parity(sample_file: Path, encode: Callable[[str], list[int]], decode: Callable[[int], str]
                  ) -> dict[str, object]:
    """An artifact's tokenizer (`encode`, without special tokens) against the source's on the evaluation's sample:
    a JSON file holding its text and the ids the source's tokenizer gave it."""
    sample = json.loads(Path(sample_file).read_text())
    return tokenizer_parity(sample["ids"], encode(sample["text"]), decode)


@dataclass(frozen=True)
class Measurement:
    """An artifact's evaluation as steps record it (the `data` of a <format>.evaluate step), read back typed."""

    ppl: float
    source_ppl: float
    delta_ppl: float
    kld_mean: float
    ppl_err: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    tokens_scored: int | None = None
    tokenizer_same: bool | None = None  # None: not checked
    tokenizer_difference: str | None = None
    chat_template_missing: bool = False

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Measurement:
        parity = data.get("tokenizer") or {}
        return cls(ppl=data["ppl"], source_ppl=data["source_ppl"], delta_ppl=data["delta_ppl"],
                   kld_mean=data["kld_mean"], ppl_err=data.get("ppl_err"), kld_p99=data.get("kld_p99"),
                   top1=data.get("top1"), tokens_scored=data.get("tokens_scored"), tokenizer_same=parity.get("same"),
                   tokenizer_difference=parity.get("first_difference"),
                   chat_template_missing=bool(data.get("chat_template_missing")))
