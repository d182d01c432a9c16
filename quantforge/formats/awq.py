"""AWQ through GPTQModel, written as GEMM (`quant_method: awq`, `version: gemm`, fp16 scales, zero points),
the layout transformers, vLLM and TGI read. The steps are those of every GPTQModel checkpoint
(formats/checkpoint.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..config import AWQTarget, ModelTarget
from ..evaluate import EvalSteps
from ..plan import PlanContext, Step
from . import PlannedFormat
from .checkpoint import plan_checkpoint


def plan(model: ModelTarget, target: AWQTarget, source: Step, evaluation: EvalSteps, context: PlanContext,
         calibration: Callable[..., Step]) -> PlannedFormat:
    settings = {"bits": target.bits, "group_size": target.group_size, "zero_point": target.zero_point}
    return plan_checkpoint("awq", settings, model, target, source, evaluation, context, calibration)
