"""The dominance gate of a GGUF variant: it is published only if it beats the stock types of the same build,
measured on the same windows, at its size.

    gguf.quantize[variant] ─┐
    gguf.evaluate[variant] ─┤
    gguf.verify[variant] ───┼► gguf.variant_gate ─► publish
    gguf.quantize[stock] ───┤   (every stock type's size and mean KLD, read as data)
    gguf.evaluate[stock] ───┘

The stock frontier is the stock files that no smaller-or-equal stock file beats on mean KLD, joined by straight
lines in (size, KLD). A variant must have a lower mean KLD than the frontier at its size: the linear interpolation
between the frontier files just smaller and just larger than it. Larger than every stock file, it must beat the
best (largest) one; smaller than every stock file, nothing is at or below its size, so nothing dominates it and
it passes this gate (its limits on ΔPPL and KLD still hold). The limits of an ordinary gate apply too: a
variant's own `gguf/NAME` keys where a builtin one has them, else its base type's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..config.schema import EvaluationSettings
from ..core.registry import step_kind
from ..core.step import Step, StepContext, StepOutput
from ..errors import GateFailed
from ..figures import format_size
from ..metrics import Measurement
from ..steps.gate import gate_step, judge

VARIANT_GATE_KIND = "gguf.variant_gate"


def format_kld(value: float) -> str:
    """Four decimals, as the cards print KLD; significant digits below that (a tiny model's are 1e-6)."""
    return f"{value:.4f}" if value >= 1e-3 or value == 0 else f"{value:.3g}"


@dataclass(frozen=True)
class Point:
    """A file on the (size, mean KLD) plane."""

    name: str
    size: int
    kld: float

    def desc(self) -> str:
        return f"{self.name} ({format_size(self.size)}, KLD {format_kld(self.kld)})"


@dataclass(frozen=True)
class Verdict:
    """How a variant compares with the stock frontier at its size."""

    passed: bool
    frontier_kld: float | None  # the frontier at the variant's size; None when no stock file is at or below it
    below: Point | None  # the frontier files it is interpolated between
    above: Point | None
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def frontier(stock: Sequence[Point]) -> list[Point]:
    """The stock files that no smaller-or-equal file beats on mean KLD, smallest first (non-finite KLDs are left
    out: such a file fails its own gate)."""
    out: list[Point] = []
    for point in sorted((p for p in stock if math.isfinite(p.kld)), key=lambda p: (p.size, p.kld)):
        if not out or point.kld < out[-1].kld:
            out.append(point)
    return out


def dominance(variant: Point, stock: Sequence[Point]) -> Verdict:
    front = frontier(stock)
    below = next((p for p in reversed(front) if p.size <= variant.size), None)
    above = next((p for p in front if p.size >= variant.size), None)
    if not math.isfinite(variant.kld):
        return Verdict(False, None, below, above, f"mean KLD is {variant.kld}: nothing to compare")
    if below is None:  # smaller than every stock file (or none measured): nothing at or below its size beats it
        return Verdict(True, None, None, above)
    if above is None or above.size == below.size:
        expected, between = below.kld, f"the largest stock file, {below.desc()}" if above is None else below.desc()
    else:
        expected = below.kld + (above.kld - below.kld) * (variant.size - below.size) / (above.size - below.size)
        between = f"interpolated between {below.desc()} and {above.desc()}"
    if variant.kld < expected:
        return Verdict(True, expected, below, above)
    return Verdict(False, expected, below, above,
                   f"mean KLD {format_kld(variant.kld)} is not below the stock frontier's {format_kld(expected)} "
                   f"at its size ({format_size(variant.size)}; {between}): a stock file is as good for its bytes")


def point(name: str, artifact: StepOutput, evaluation: StepOutput) -> Point:
    return Point(name, int(artifact.data["size"]), float(evaluation.data["kld_mean"]))


def variant_gate(label: str, name: str, base: str, evaluate: Step, verify: Step, quantize: Step,
                 stock: Mapping[str, tuple[Step, Step]], settings: EvaluationSettings, default_ppl: float | None,
                 enforce: bool, model: str) -> Step:
    """A variant's gate: its base type's limits (or its own, for a builtin name keyed in the evaluation settings)
    and the stock frontier. stock: type -> (quantize step, evaluate step), all read as data."""
    keyed = any(f"gguf/{name}" in getattr(settings, table) for table in ("max_ppl_increase", "max_kld"))
    plain = gate_step(label, "gguf", name if keyed else base, evaluate, verify, settings, default_ppl, enforce, model)
    inputs: dict[str, Step] = {**plain.inputs, "artifact": quantize}
    for stock_name, (stock_quantize, stock_evaluate) in stock.items():
        inputs[f"stock-artifact:{stock_name}"] = stock_quantize
        inputs[f"stock-evaluation:{stock_name}"] = stock_evaluate
    return Step(VARIANT_GATE_KIND, label, params={**plain.params, "gate_name": f"gguf/{name}", "stock": list(stock)},
                inputs=inputs, model=model, fmt="gguf", qtype=name, data_only=frozenset(inputs))


@step_kind(VARIANT_GATE_KIND, version="1", stage="gate")
def run_variant_gate(step: Step, ctx: StepContext) -> dict[str, Any]:
    """A gate's limits, then the frontier: GateFailed naming the variant's mean KLD and the frontier's."""
    result = ctx.inputs["evaluation"].data
    outcome = judge(Measurement.from_data(result), dict(step.params))
    stock = [point(name, ctx.inputs[f"stock-artifact:{name}"], ctx.inputs[f"stock-evaluation:{name}"])
             for name in step.params["stock"]]
    verdict = dominance(point(step.qtype or "", ctx.inputs["artifact"], ctx.inputs["evaluation"]), stock)
    if verdict.problem:
        outcome = replace(outcome, passed=False, problems=[*outcome.problems, verdict.problem])
    if outcome.problems and outcome.enforced:
        raise GateFailed(f"gate {outcome.name} failed: " + "; ".join(outcome.problems))
    return {**result, "sample": ctx.inputs["check"].data.get("generated_text"), "gate": outcome.to_json(),
            "frontier": verdict.to_json()}


def published_points(artifacts: Mapping[str, tuple[StepOutput, StepOutput]]) -> tuple[list[Point], list[Point]]:
    """The stock files and the variants of a repo (type -> (quantize output, gate output)) that have a size and
    a mean KLD, as points."""
    stock: list[Point] = []
    variants: list[Point] = []
    for name, (quant, gate) in artifacts.items():
        if "size" in quant.data and isinstance(gate.data.get("kld_mean"), int | float):
            (variants if quant.data.get("recipe") else stock).append(point(name, quant, gate))
    return stock, variants
