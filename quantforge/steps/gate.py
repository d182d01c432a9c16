"""Quality gates: the limits an artifact's measurements must meet before it may be published.

    <format>.evaluate ─┐
    <format>.verify ───┴► gate ─► publish

A gate's limits are its parameters, so changing one re-runs only the gate, never the measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config.schema import EvaluationSettings
from ..core.registry import step_kind
from ..core.step import Step, StepContext
from ..errors import GateFailed
from ..metrics import Measurement


@dataclass(frozen=True)
class GateOutcome:
    name: str  # "gguf/Q4_K_M", "gptq"
    passed: bool
    enforced: bool
    problems: list[str]
    max_ppl_increase: float | None
    max_kld: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gate_step(label: str, fmt: str, qtype: str | None, evaluation: Step, check: Step, settings: EvaluationSettings,
              default_ppl: float | None, enforce: bool, model: str) -> Step:
    params = {
        "max_ppl_increase": settings.gate("max_ppl_increase", fmt, qtype, default_ppl),
        "max_kld": settings.gate("max_kld", fmt, qtype, None),
        "tokenizer_check": settings.tokenizer_check,
        "enforce": enforce,
        "gate_name": f"{fmt}/{qtype}" if qtype else fmt,
    }
    # the measurements and the sample are read as data: where a destination recorded them, a changed limit
    # re-judges them without measuring (or building) anything again
    return Step("gate", label, params=params, inputs={"evaluation": evaluation, "check": check}, model=model,
                fmt=fmt, qtype=qtype, data_only=frozenset({"evaluation", "check"}))


def judge(measured: Measurement, params: dict[str, Any]) -> GateOutcome:
    max_ppl, max_kld = params["max_ppl_increase"], params["max_kld"]
    figures = {"PPL": measured.ppl, "source PPL": measured.source_ppl, "ΔPPL": measured.delta_ppl,
               "KLD": measured.kld_mean}
    broken = {name: value for name, value in figures.items() if value is None or not math.isfinite(value)}
    if broken:
        # NaN compares false with every limit: without this, garbage would pass every gate
        return GateOutcome(params["gate_name"], False, params["enforce"],
                           ["measurement is not a finite number (" + ", ".join(f"{k} {v}" for k, v in broken.items())
                            + "): the artifact's logits are NaN or infinite"], max_ppl, max_kld)
    problems = []
    if max_ppl is not None and measured.delta_ppl > max_ppl:
        problems.append(f"ΔPPL {measured.delta_ppl:+.2%} exceeds max_ppl_increase {max_ppl:.2%} "
                        f"(PPL {measured.ppl:.3f} vs source {measured.source_ppl:.3f})")
    if max_kld is not None and measured.kld_mean > max_kld:
        problems.append(f"KLD {measured.kld_mean:.4f} exceeds max_kld {max_kld:.4f}")
    if params["tokenizer_check"] and measured.tokenizer_same is False:
        problems.append(f"tokenizer differs from the source's: {measured.tokenizer_difference}")
    if measured.chat_template_missing:
        problems.append("the source has a chat template but the artifact does not embed it")
    return GateOutcome(params["gate_name"], not problems, params["enforce"], problems, max_ppl, max_kld)


@step_kind("gate", version="2", stage="gate")  # 2: non-finite measurements fail
def run_gate(step: Step, ctx: StepContext) -> dict[str, Any]:
    """Compare an artifact's measurements with its limits; raise GateFailed naming every gate it misses."""
    result = ctx.inputs["evaluation"].data
    outcome = judge(Measurement.from_data(result), dict(step.params))
    if outcome.problems and outcome.enforced:
        raise GateFailed(f"gate {outcome.name} failed: " + "; ".join(outcome.problems))
    return {**result, "sample": ctx.inputs["check"].data.get("generated_text"), "gate": outcome.to_json()}
