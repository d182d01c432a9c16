"""Model cards for published repos, rendered with huggingface_hub's card tooling from a Jinja template.

The card says which file to pick and proves what was measured: the quant table comes from the same
evaluation the gates used, and the provenance from the steps' manifests.
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .engine import StepOutput

CARD_FILE = "README.md"


def card_template(fmt: str) -> str:
    name = "gguf" if fmt == "gguf" else "checkpoint"  # GPTQ and AWQ share one card
    return resources.files("quantforge").joinpath(f"templates/{name}_card.md.jinja").read_text(encoding="utf-8")


def card_template_version(fmt: str) -> str:
    """Part of the publish step's key: editing the template republishes the cards."""
    return hashlib.sha256(card_template(fmt).encode()).hexdigest()[:16]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _pct(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.2%}" if signed else f"{value:.1%}"


def source_card(path: Path) -> tuple[dict[str, Any], str]:
    """The source checkpoint's own card: its metadata and its text (without front matter)."""
    from huggingface_hub import ModelCard

    readme = path / CARD_FILE
    if not readme.is_file():
        return {}, ""
    card = ModelCard.load(readme)
    return card.data.to_dict(), card.text.strip()


def chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text().strip()
    try:
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def _render(card_format: str, source: StepOutput, namespace: str, library_name: str, tags: set[str],
            **variables: Any) -> str:
    """Fill a format's template with `variables` plus what every card says of the source and the build. The
    front matter carries over the source's license and language, and the Hub's quantized-model relation when
    the source is a Hub repo."""
    from huggingface_hub import ModelCard, ModelCardData

    params = source.manifest["params"]
    source_dir = Path(source.data["path"])
    is_hub = "commit" in params
    meta, text = source_card(source_dir)
    data = ModelCardData(
        base_model=params["source"] if is_hub else None,
        license=meta.get("license"),
        license_name=meta.get("license_name"),
        license_link=meta.get("license_link"),
        language=meta.get("language"),
        library_name=library_name,
        pipeline_tag=meta.get("pipeline_tag") or "text-generation",
        tags=sorted({"quantized", "quantforge", *tags}),
        quantized_by=namespace,
        **({"base_model_relation": "quantized"} if is_hub else {}),
    )
    card = ModelCard.from_template(
        data, template_str=card_template(card_format), source=params["source"],
        source_url=f"https://huggingface.co/{params['source']}" if is_hub else None,
        source_revision=params.get("commit") or params.get("digest", "")[:16],
        chat_template=chat_template(source_dir), source_card=text, quantforge_version=__version__,
        build_date=time.strftime("%Y-%m-%d", time.gmtime()), **variables,
    )
    return str(card)


def _measured(artifact: dict[str, Any], gate: dict[str, Any]) -> dict[str, str]:
    """An artifact's size per weight and its gate's measurements, as the cards print them."""
    return {
        "bpw": f"{artifact['bits_per_weight']:.2f}" if artifact.get("bits_per_weight") else "-",
        "ppl": f"{gate['ppl']:.3f} ± {gate['ppl_err']:.3f}" if "ppl" in gate else "-",
        "delta_ppl": _pct(gate.get("delta_ppl")),
        "kld": f"{gate['kld_mean']:.4f}" if "kld_mean" in gate else "-",
        "top1": _pct(gate.get("top1"), signed=False),
    }


def _eval_desc(tokens: StepOutput | None) -> str:
    tok = tokens.manifest["params"] if tokens else {}
    return (f"`{tok.get('dataset')}`, {tok.get('chunks')} windows of {tok.get('ctx')} tokens, second half of each "
            "scored" if tok else "not measured")


def render_gguf_card(*, repo_id: str, model: str, namespace: str, source: StepOutput,
                     artifacts: dict[str, tuple[StepOutput, StepOutput]], tokens: StepOutput | None,
                     shards: dict[str, list[str]] | None = None) -> str:
    """artifacts: type -> (quantize output, gate output); shards: type -> split file names, when split."""
    rows = []
    fallback_pairs: dict[str, int] = {}
    for qtype, (quant, gate) in artifacts.items():
        q, g = quant.data, gate.data
        for f in q.get("fallbacks", []):
            pair = f"{f['wanted']}→{f['used']}"
            fallback_pairs[pair] = fallback_pairs.get(pair, 0) + 1
        n_fb = len(q.get("fallbacks", []))
        parts = (shards or {}).get(qtype)
        notes = [f"{n_fb} tensor{'s' if n_fb > 1 else ''} fell back"] if n_fb else []
        if parts:
            notes.append(f"split in {len(parts)} files; load the first")
        rows.append({
            "file": parts[0] if parts else q["file"], "type": qtype, "size": _size(q["size"]), "size_bytes": q["size"],
            **_measured(q, g),
            "notes": "; ".join(notes),
            "memory": _size(int(q["size"] * 1.15 + 0.5e9)),
        })
    first_gate = next(iter(artifacts.values()))[1].data
    types = [r["type"] for r in rows]
    default_type = next((t for t in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0") if t in types), types[0])
    first_quant = next(iter(artifacts.values()))[0]
    arch = first_quant.data.get("architecture")
    return _render(
        "gguf", source, namespace, "gguf", {"gguf", "llama.cpp", *([arch] if arch else [])},
        repo_id=repo_id, model=model,
        artifacts=rows, by_size=sorted(rows, key=lambda r: r["size_bytes"]),
        source_ppl=f"{first_gate['source_ppl']:.3f}" if "source_ppl" in first_gate else "-",
        tokens_scored=first_gate.get("tokens_scored", 0), eval_desc=_eval_desc(tokens),
        fallbacks=", ".join(f"{n}× {p}" for p, n in sorted(fallback_pairs.items())),
        default_type=default_type,
        converter=first_quant.data.get("converter", "llama.cpp's convert_hf_to_gguf.py"),
        libllama=first_quant.manifest["tools"].get("libllama", "?"),
        imatrix=_imatrix_desc({t: q.data["imatrix"] for t, (q, _) in artifacts.items() if q.data.get("imatrix")}),
    )


def _imatrix_desc(by_type: dict[str, dict[str, Any]]) -> str | None:
    """type -> the imatrix record of its quantize step; None when no file used one."""
    if not by_type:
        return None
    first = next(iter(by_type.values()))
    return (f"{', '.join(by_type)} {'was' if len(by_type) == 1 else 'were'} quantized with one, covering "
            f"{first['tensors']} weight matrices, computed on {_calibration_desc(first.get('calibration'))}")


def _calibration_desc(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return "-"
    return (f"`{calibration['dataset']}`, {calibration['samples']} samples of {calibration['seq_len']} tokens "
            "(from the end of the text; evaluation windows come from its start)")


def render_checkpoint_card(*, repo_id: str, model: str, namespace: str, source: StepOutput,
                           artifacts: dict[str, tuple[StepOutput, StepOutput]], tokens: StepOutput | None,
                           fmt: str) -> str:
    """The card of a GPTQ or AWQ repo: one checkpoint, its settings, its measurements, and how to load it."""
    quant, gate = next(iter(artifacts.values()))
    q, g = quant.data, gate.data
    arch = q.get("architecture")
    settings = [f"{q['bits']}-bit", f"group size {q['group_size']}"]
    if fmt == "gptq":
        settings += [f"desc_act {str(q['desc_act']).lower()}", f"sym {str(q['sym']).lower()}", f"damp {q['damp']}"]
    else:
        settings += [f"zero point {str(q['zero_point']).lower()}", "GEMM"]
    return _render(
        fmt, source, namespace, "transformers", {fmt, f"{q['bits']}-bit", "gptqmodel", *([arch] if arch else [])},
        repo_id=repo_id, model=model, fmt=fmt, FMT=fmt.upper(),
        settings=", ".join(settings), size=_size(q["size"]), **_measured(q, g),
        source_ppl=f"{g['source_ppl']:.3f}" if "source_ppl" in g else "-",
        tokens_scored=g.get("tokens_scored", 0), eval_desc=_eval_desc(tokens),
        calibration=_calibration_desc(q.get("calibration")), device=q.get("device", "?"),
        quantize_minutes=f"{q.get('quantize_seconds', 0) / 60:.1f}",
        gptqmodel=quant.manifest["tools"].get("gptqmodel", "?"),
    )
