"""The assembler: validated targets (or `quantforge eval`'s ad-hoc artifact) -> a plan. The one module that
knows every step family: it asks the source, evaluation, calibration, each format and the publisher for their
steps, and wires them together.

    per model:  source ─► eval.tokens ─► eval.reference
                source ─► [calibration] ─► <format steps> ─► gate ─► publish     (one publish per format)
                                                       (to the Hub: gate ─► publish.upload ─► publish)
"""

from __future__ import annotations

from pathlib import Path

from .config.loader import load_targets as load_targets_file
from .config.loader import schema_for
from .config.schema import EvaluationSettings, ModelTarget, Targets
from .core.formats import Format, registered_formats
from .core.plan import Plan, topological
from .core.step import PlanContext, Step
from .errors import BadInputError
from .formats import awq, fp8, gguf, gptq, mlx
from .publish import publish_step
from .publish.upload import upload_steps
from .steps.calibration import calibration_step
from .steps.evaluation import plan_evaluation
from .steps.gate import gate_step
from .steps.source import source_step

# The formats offered, in the order `formats:` lists them: a new format is one module and one entry here.
FORMAT_MODULES = (gguf, gptq, awq, fp8, mlx)
FORMATS: dict[str, Format] = {module.FORMAT.name: module.FORMAT for module in FORMAT_MODULES}
assert FORMATS == registered_formats(), "every registered format is offered, and only those"
# the pip packages whose versions enter step keys, every format's (pinned by `ci init`)
KEY_TOOLS = tuple(dict.fromkeys(tool for fmt in FORMATS.values() for tool in fmt.key_tools))


def load_targets(path: str | Path) -> Targets:
    """Read and validate a targets file against every format's settings model."""
    return load_targets_file(path, {name: fmt.settings for name, fmt in FORMATS.items()})


def build_plan(targets: Targets, context: PlanContext) -> Plan:
    """Every step for every model and format, in dependency order."""
    steps: list[Step] = []
    for model in targets.models:
        src = source_step(model, targets, context)
        evaluation = plan_evaluation(model, targets, src, context)
        steps += [src, evaluation.tokens, evaluation.reference]
        for fmt_name in model.formats.enabled():
            # the calibration windows a format asks for (shared when two formats ask for the same)
            def calibration(model: ModelTarget = model, src: Step = src, **override) -> Step:
                return calibration_step(model, targets, src, context, **override)

            planned = FORMATS[fmt_name].plan(model, model.formats.settings(fmt_name), src, evaluation, context,
                                             calibration)
            # to the Hub, each artifact is uploaded right after its gate: with --evict it is gone before the next
            uploads = upload_steps(model, fmt_name, planned.publishable)
            after_gate = {id(upload.after[0]): upload for upload in uploads}
            for step in planned.steps:
                steps += [step, after_gate[id(step)]] if id(step) in after_gate else [step]
            steps.append(publish_step(model, fmt_name, planned.publishable, src, evaluation.tokens, targets,
                                      planned.extras, uploads))
    return Plan(targets, topological(steps))


def plan_adhoc(artifact: Path, source: str, revision: str, settings: EvaluationSettings,
               context: PlanContext, max_ppl_increase: float | None, max_kld: float | None) -> Plan:
    """`quantforge eval`: score an artifact made elsewhere (a GGUF file, a checkpoint folder) against a source
    model, through the same steps (and the same cache) as a build."""
    targets = Targets(path=Path.cwd() / "<quantforge eval>", models=())
    # an ad-hoc model names one format to be valid; its steps come from the artifact's own format below
    _, target_model = schema_for(tuple((name, fmt.settings) for name, fmt in FORMATS.items()))
    model = target_model(name="eval", source=source, revision=revision, formats={"gguf": {}}, evaluation=settings)
    src = source_step(model, targets, context)
    evaluation = plan_evaluation(model, targets, src, context)
    path = artifact.resolve()
    found = None
    if path.exists():
        found = next((a for fmt in FORMATS.values() if (a := fmt.adhoc(path, src, evaluation, context))), None)
    if found is None:
        raise BadInputError(f"{artifact}: not an artifact of a format quantforge builds: expected a .gguf file or a "
                            f"quantized checkpoint folder ({', '.join(FORMATS)})")
    fmt = found.format
    limits = settings.model_copy(update={"max_ppl_increase": {fmt: max_ppl_increase} if max_ppl_increase
                                         is not None else {}, "max_kld": {fmt: max_kld} if max_kld
                                         is not None else {}})
    gate = gate_step(f"{artifact.name}:gate", fmt, None, found.evaluate, found.artifact, limits, None, True, "eval")
    return Plan(targets, topological([gate]))
