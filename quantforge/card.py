"""Model cards for published repos, rendered with huggingface_hub's card tooling from a format's Jinja template.

This module renders what every card says of the source and the build (front matter, source, provenance, chat
template, the source's own card) and formats measurements; each format fills its own section (formats/gguf.py,
steps/checkpoint.py). The quant table comes from the same evaluation the gates used, the provenance from the
steps' manifests.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .chat_template import read_chat_template
from .config.schema import ModelTarget, is_local_source
from .core.formats import ReleaseInfo
from .core.step import StepOutput
from .data import parse_text_source
from .figures import format_pct
from .toolchains import tokenizer_worker

CARD_FILE = "README.md"
HUB_URL = "https://huggingface.co"  # repo links in cards and GGUF metadata name the Hub, whatever `publish.to` is
# the conversation the prompt-format example renders (user, then assistant: every chat template accepts it)
EXAMPLE_CHAT = ({"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."})

__all__ = ["CARD_FILE", "HUB_URL", "SourceFacts", "calibration_desc", "calibration_text", "card_template_version",
           "chat_example", "eval_desc", "hub_url", "measured", "public_text_name", "release_info", "render_card",
           "repo_id", "source_facts"]


def repo_id(model: ModelTarget, fmt: str) -> str:
    """The repo a model's format is published to, e.g. my-org/Qwen2.5-7B-Instruct-GGUF."""
    settings = getattr(model.formats, fmt, None)
    label = settings.repo_label() if settings is not None else None
    return f"{model.publish.namespace}/{model.publish.repo_name(model.name, fmt, label)}"


def release_info(model: ModelTarget) -> ReleaseInfo:
    """The model tree and licence a model's repos declare: from targets.yaml, else (base_model) the Hub source."""
    base_model = model.base_model or (None if is_local_source(model.source) else model.source)
    return ReleaseInfo(base_model=base_model, license=model.license, license_name=model.license_name,
                       license_link=model.license_link)


def hub_url(repo: str) -> str:
    return f"{HUB_URL}/{repo}"


def public_text_name(spec: str) -> str:
    """A text spec (builtin | file:PATH[,PATH] | hf:...) as a published repo may name it: local files by their
    names alone, so that no card, manifest or GGUF key reveals a user's directories."""
    try:
        source = parse_text_source(spec)
    except ValueError:
        return spec
    if source.kind != "file":
        return spec
    return "file:" + ",".join(Path(p).name for p in source.paths)


GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class SourceFacts:
    """What cards and repo files say of the source, read once from its files by the source step and kept in its
    data: a publish that only re-renders a card (a gate or the template changed) then needs the source step's
    recorded data, not its files."""

    card_meta: dict[str, Any] = field(default_factory=dict)  # the source card's front matter
    card_text: str = ""  # the source card without its front matter
    chat_template: str | None = None
    chat_example: str | None = None  # the template applied to EXAMPLE_CHAT by transformers
    generation_config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceFacts:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def read(cls, path: Path) -> SourceFacts:
        meta, text = source_card(path)
        try:
            generation = json.loads((path / GENERATION_CONFIG).read_text())
        except (OSError, ValueError):
            generation = {}
        return cls(meta, text, read_chat_template(path), chat_example(path),
                   generation if isinstance(generation, dict) else {})


def source_facts(source: StepOutput) -> SourceFacts:
    """A source step's facts: from its data, or (an output made before the facts were kept) from its files."""
    data = source.data
    return SourceFacts.from_json(data["facts"]) if "facts" in data else SourceFacts.read(Path(data["path"]))


def card_template(template: str) -> str:
    return resources.files("quantforge").joinpath(f"templates/{template}").read_text(encoding="utf-8")


def card_template_version(template: str) -> str:
    """Part of the publish step's key: editing the template republishes the cards."""
    return hashlib.sha256(card_template(template).encode()).hexdigest()[:16]


def source_card(path: Path) -> tuple[dict[str, Any], str]:
    """The source checkpoint's own card: its metadata and its text (without front matter)."""
    from huggingface_hub import ModelCard

    readme = path / CARD_FILE
    if not readme.is_file():
        return {}, ""
    card = ModelCard.load(readme)
    return card.data.to_dict(), card.text.strip()


def render_card(template: str, source: StepOutput, namespace: str, library_name: str, tags: set[str],
                release: ReleaseInfo | None = None, **variables: Any) -> str:
    """Fill a format's template with `variables` plus what every card says of the source and the build. The
    front matter puts the repo in the Hub's model tree (base_model, relation `quantized`) when the base model is
    known (declared, or the Hub source itself), and carries the declared licence, else the source card's."""
    from huggingface_hub import ModelCard, ModelCardData

    release = release or ReleaseInfo()
    params = source.params
    facts = source_facts(source)
    is_hub = "digest" not in params  # a local source is keyed by its content digest, a Hub one by its files' ids
    meta = facts.card_meta
    base_model = release.base_model or (params["source"] if is_hub else None)
    # a declared licence comes with its own name and link; otherwise all three are the source card's
    licence = release if release.license else ReleaseInfo(license=meta.get("license"),
                                                          license_name=meta.get("license_name"),
                                                          license_link=meta.get("license_link"))
    data = ModelCardData(
        base_model=base_model,
        license=licence.license,
        license_name=licence.license_name,
        license_link=licence.license_link,
        language=meta.get("language"),
        library_name=library_name,
        pipeline_tag=meta.get("pipeline_tag") or "text-generation",
        tags=sorted({"quantized", "quantforge", *tags}),
        quantized_by=namespace,
        **({"base_model_relation": "quantized"} if base_model else {}),
    )
    card = ModelCard.from_template(
        data, template_str=card_template(template), source=params["source"] if is_hub else None,
        source_url=hub_url(params["source"]) if is_hub else None,
        source_revision=source.data.get("commit") or params.get("digest", "")[:16],
        base_model=base_model, base_model_url=hub_url(base_model) if base_model else None,
        siblings=[{"format": fmt.upper(), "repo_id": repo, "url": hub_url(repo)} for fmt, repo in release.siblings],
        chat_template=facts.chat_template, chat_example=facts.chat_example, source_card=facts.card_text,
        quantforge_version=__version__, build_date=time.strftime("%Y-%m-%d", time.gmtime()), **variables,
    )
    return str(card)


def chat_example(source_dir: Path) -> str | None:
    """The source's chat template applied by transformers to a two-message conversation: what the runtime feeds
    the model, which the Jinja alone makes hard to see. None when there is no template or it does not render."""
    if read_chat_template(source_dir) is None:
        return None
    # a template that needs tools, a date or remote code does not render: the card then shows the Jinja only
    return tokenizer_worker.chat_example(source_dir, list(EXAMPLE_CHAT))


def measured(artifact: dict[str, Any], gate: dict[str, Any]) -> dict[str, str]:
    """An artifact's size per weight and its gate's measurements, as the cards print them."""
    return {
        "bpw": f"{artifact['bits_per_weight']:.2f}" if artifact.get("bits_per_weight") else "-",
        "ppl": f"{gate['ppl']:.3f} ± {gate['ppl_err']:.3f}" if "ppl" in gate else "-",
        "delta_ppl": format_pct(gate.get("delta_ppl")),
        "kld": f"{gate['kld_mean']:.4f}" if "kld_mean" in gate else "-",
        "top1": format_pct(gate.get("top1"), signed=False, digits=1),
        "gate": gate_desc(gate.get("gate") or {}),
    }


def gate_desc(outcome: dict[str, Any]) -> str:
    """The limits an artifact was published under (its gate step's outcome), as the cards print them."""
    limits = ([f"ΔPPL ≤ {format_pct(outcome['max_ppl_increase'], digits=1)}"]
              if outcome.get("max_ppl_increase") is not None else []) + \
             ([f"KLD ≤ {outcome['max_kld']:g}"] if outcome.get("max_kld") is not None else [])
    if outcome and not outcome.get("enforced", True):
        return "not enforced (--no-gate)" + ("; missed" if not outcome.get("passed", True) else "")
    return ", ".join(limits) or "-"


def eval_desc(tokens: StepOutput | None) -> str:
    tok = tokens.params if tokens else {}
    if not tok:
        return "not measured"
    return (f"`{public_text_name(str(tok.get('dataset')))}`, {tok.get('chunks')} windows of {tok.get('ctx')} "
            "tokens, second half of each scored")


def calibration_desc(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return "-"
    text = calibration.get("text") or {}
    digest = f", sha256 `{text['sha256'][:12]}…`" if text.get("sha256") else ""
    parts = ""
    if text.get("parts"):  # builtin:mix: what the windows hold, by tokens
        parts = "; " + ", ".join(f"{p['name']} {_share(p)}" for p in text["parts"])
    return (f"`{public_text_name(calibration['dataset'])}`{digest}, {calibration['samples']} samples of "
            f"{calibration['seq_len']} tokens{parts} (from the end of the text; evaluation windows come from its "
            "start)")


def _share(part: dict[str, Any]) -> str:
    """A part's share of the calibration windows' tokens (of its characters, before a tokenizer saw it)."""
    return format_pct(part.get("window_share", part["characters_share"]), signed=False, digits=1)


def calibration_text(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """A mixed calibration text's make-up as cards show it (a table row per part); None for any other text."""
    text = (calibration or {}).get("text") or {}
    if not text.get("parts"):
        return None
    rows = [{"name": p["name"], "what": p["description"],
             "contents": ", ".join(p.get("contents", [])),
             "share": _share(p), "characters": format_pct(p["characters_share"], signed=False, digits=1),
             "sources": ", ".join(f"{s['package']} {s['version']} ({s['license']})" for s in p["sources"])}
            for p in text["parts"]]
    return {"name": public_text_name(calibration["dataset"]), "sha256": text["sha256"], "chat": text.get("chat", ""),
            "tokens": text.get("tokens"), "parts": rows}
