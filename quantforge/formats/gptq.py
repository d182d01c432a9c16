"""GPTQ through GPTQModel, written in the classic (v1) checkpoint format: `quant_method: gptq`,
`checkpoint_format: gptq`, and a `quantize_config.json` beside `config.json`, which transformers, vLLM and TGI
all read. The steps are those of every GPTQModel checkpoint (formats/checkpoint.py)."""

from __future__ import annotations

from collections.abc import Callable

from ..config import GPTQTarget, ModelTarget
from ..evaluate import EvalSteps
from ..plan import PlanContext, Step
from . import PlannedFormat
from .checkpoint import plan_checkpoint


def plan(model: ModelTarget, target: GPTQTarget, source: Step, evaluation: EvalSteps, context: PlanContext,
         calibration: Callable[..., Step]) -> PlannedFormat:
    settings = {"bits": target.bits, "group_size": target.group_size, "desc_act": target.desc_act,
                "sym": target.sym, "damp": target.damp}
    return plan_checkpoint("gptq", settings, model, target, source, evaluation, context, calibration)
