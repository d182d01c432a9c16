"""Step kind -> the function that does its work, imported only when a step of that kind runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import StepContext
    from .plan import Step

RunFn = Callable[["Step", "StepContext"], dict[str, Any]]

_RUNNERS = {
    "source": "quantforge.sources:run_fetch",
    "calibration": "quantforge.calibrate:run_calibration",
    "gguf.imatrix": "quantforge.calibrate:run_imatrix",
    "gguf.convert": "quantforge.formats.gguf:run_convert",
    "gguf.quantize": "quantforge.formats.gguf:run_quantize",
    "gguf.verify": "quantforge.formats.gguf:run_verify",
    "gguf.evaluate": "quantforge.formats.gguf:run_evaluate",
    "gguf.external": "quantforge.formats.gguf:run_external",
    "gptq.quantize": "quantforge.formats.checkpoint:run_quantize",
    "awq.quantize": "quantforge.formats.checkpoint:run_quantize",
    "checkpoint.verify": "quantforge.formats.checkpoint:run_verify",
    "checkpoint.evaluate": "quantforge.formats.checkpoint:run_evaluate",
    "checkpoint.external": "quantforge.formats.checkpoint:run_external",
    "eval.tokens": "quantforge.evaluate:run_tokens",
    "eval.reference": "quantforge.evaluate:run_reference",
    "gate": "quantforge.evaluate:run_gate",
    "publish": "quantforge.publish:run_publish",
}
# Bump a kind's version when its implementation changes what it produces: its outputs become stale.
VERSIONS = {
    "source": "1",
    "calibration": "1",
    "gguf.imatrix": "1",
    "gguf.convert": "1",
    "gguf.quantize": "1",
    "gguf.verify": "1",
    "gguf.evaluate": "1",
    "gguf.external": "1",
    "gptq.quantize": "1",
    "awq.quantize": "1",
    "checkpoint.verify": "1",
    "checkpoint.evaluate": "1",
    "checkpoint.external": "1",
    "eval.tokens": "1",
    "eval.reference": "1",
    "gate": "1",
    "publish": "2",
}

# Kinds whose effect lives outside the work dir say whether a cached output still holds (None = it does).
_CHECKS = {
    "publish": "quantforge.publish:check_published",
}

_extra: dict[str, RunFn] = {}


def register(kind: str, fn: RunFn) -> None:
    """Add a step kind at run time (plugins and tests)."""
    _extra[kind] = fn


def runner_for(kind: str) -> RunFn:
    if kind in _extra:
        return _extra[kind]
    return _import(_RUNNERS[kind])


def check_cached(step: Step, manifest: dict[str, Any]) -> str | None:
    """Why a cached output no longer stands (e.g. its published copy was deleted), or None."""
    if step.kind not in _CHECKS:
        return None
    return _import(_CHECKS[step.kind])(step, manifest)


def _import(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
