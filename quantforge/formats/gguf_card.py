"""The GGUF repo's model card: the files smallest first with the recommended one marked, what the measurements
can and cannot tell apart, how to download and run a file, the sampling defaults, and where the files came from."""

from __future__ import annotations

from typing import Any

from ..card import calibration_desc, calibration_text, eval_desc, measured, render_card
from ..core.formats import ReleaseInfo
from ..core.step import StepOutput
from ..figures import format_pct, format_size
from .gguf_chart import CHART_FILE
from .gguf_frontier import format_kld
from .gguf_recipes import Recipe
from .gguf_release import imatrix_files, ollama_params, sampling_defaults
from .gguf_settings import budget_words

CARD_TEMPLATE = "gguf_card.md.jinja"
# what llama.cpp, Ollama and LM Studio pick when no type is asked for, in order; else the first type listed
DEFAULT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def render_gguf_card(*, repo_id: str, model: str, namespace: str, source: StepOutput,
                     artifacts: dict[str, tuple[StepOutput, StepOutput]], tokens: StepOutput | None,
                     shards: dict[str, list[str]] | None = None, release: ReleaseInfo | None = None,
                     extras: tuple[StepOutput, ...] = (), removed: tuple[str, ...] = ()) -> str:
    """artifacts: type -> (quantize output, gate output); shards: type -> split file names, when split;
    extras: the outputs of the format's extra steps (the importance matrix file); removed: files this
    publication deletes (types no longer declared)."""
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
        if q.get("imatrix"):
            notes.append("importance matrix")
        if parts:
            notes.append(f"split in {len(parts)} files; load the first")
        if q.get("recipe"):
            notes.insert(0, f"variant of {q['recipe']['base']} ([recipe](#quality-per-byte))")
        rows.append({
            "file": parts[0] if parts else q["file"], "type": qtype, "size": format_size(q["size"]),
            "size_bytes": q["size"], **measured(q, g), "ppl_value": g.get("ppl"), "ppl_err": g.get("ppl_err"),
            "notes": "; ".join(notes), "split": bool(parts),
            "memory": format_size(int(q["size"] * 1.15 + 0.5e9)),
        })
    by_size = sorted(rows, key=lambda r: r["size_bytes"])
    first_gate = next(iter(artifacts.values()))[1].data
    types = [r["type"] for r in rows]
    default_type = next((t for t in DEFAULT_TYPES if t in types), types[0])
    first_quant = next(iter(artifacts.values()))[0]
    arch = first_quant.data.get("architecture")
    sampling = sampling_defaults(source)
    matrix = imatrix_files(extras)
    weighted = {t: q.data["imatrix"] for t, (q, _) in artifacts.items() if q.data.get("imatrix")}
    return render_card(
        CARD_TEMPLATE, source, namespace, "gguf", {"gguf", "llama.cpp", *([arch] if arch else [])},
        release or ReleaseInfo(),
        repo_id=repo_id, model=model, artifacts=rows, by_size=by_size,
        source_ppl=f"{first_gate['source_ppl']:.3f}" if "source_ppl" in first_gate else "-",
        tokens_scored=first_gate.get("tokens_scored", 0), eval_desc=eval_desc(tokens),
        fallbacks=", ".join(f"{n}× {p}" for p, n in sorted(fallback_pairs.items())),
        default_type=default_type, downloads=downloads(repo_id, model, by_size, default_type),
        noise_notes=noise_notes(by_size), removed=list(removed),
        converter=converter_desc(first_quant.data.get("converter")),
        libllama=first_quant.tools.get("libllama", "?"),
        imatrix=_imatrix_desc(weighted),
        calibration_text=calibration_text(next(iter(weighted.values())).get("calibration") if weighted else None),
        imatrix_file=_imatrix_file(matrix[0]) if matrix else None,
        sampling=sampling, ollama_params=ollama_params(sampling),
        variants=variant_rows(repo_id, model, artifacts, matrix[0].data["file"] if matrix else None),
        chart=CHART_FILE,
        inside=metadata_keys([q.data.get("metadata") or {} for q, _ in artifacts.values()], release or ReleaseInfo()),
    )


def metadata_keys(written: list[dict[str, Any]], release: ReleaseInfo) -> list[str]:
    """The provenance keys inside the files, as the card lists them: what conversion was given (from the
    release) and what quantization wrote (recorded by each quantize step)."""
    keys = ["general.name", "general.quantized_by", "general.repo_url"]
    if release.base_model:
        keys += ["general.base_model.*", "general.source.repo_url"]
    found = {k for kv in written for k in kv}
    keys += [k for k in ("general.license",) if k in found]
    keys += ["quantforge.*"] if any(k.startswith("quantforge.") for k in found) else []
    keys += ["quantize.imatrix.*"] if any(k.startswith("quantize.imatrix.") for k in found) else []
    return keys


def downloads(repo_id: str, model: str, by_size: list[dict[str, Any]], default_type: str) -> list[dict[str, str]]:
    """`hf download` for the recommended file, and for split files the form that fetches every shard into a
    folder. The patterns match exactly one type's files (`*-F16.gguf` is not `*-BF16.gguf`)."""
    out = []
    default = next(r for r in by_size if r["type"] == default_type)
    split = next((r for r in by_size if r["split"]), None)
    for row in [default] + ([split] if split is not None and split is not default else []):
        qtype = row["type"]
        if row["split"]:
            out.append({"what": f"{qtype} is split: fetch every part into one folder, then load the first",
                        "command": f'hf download {repo_id} --include "*-{qtype}-*-of-*.gguf" '
                                   f"--local-dir {model}-{qtype}"})
        else:
            out.append({"what": f"One file ({qtype}; put another type in the pattern for another file)",
                        "command": f'hf download {repo_id} --include "*-{qtype}.gguf" --local-dir .'})
    return out


def noise_notes(by_size: list[dict[str, Any]]) -> list[str]:
    """Where a larger file measured a worse perplexity than a smaller one by less than the figures' error, the
    ranking is noise of this evaluation, not a property of the types: say so rather than let it mislead."""
    notes = []
    for i, small in enumerate(by_size):
        for large in by_size[i + 1:]:
            if None in (small["ppl_value"], large["ppl_value"], small["ppl_err"], large["ppl_err"]):
                continue
            gap = large["ppl_value"] - small["ppl_value"]
            err = max(small["ppl_err"], large["ppl_err"])
            if 0 < gap < err:
                notes.append(f"{large['type']} measured a higher perplexity than the smaller {small['type']} "
                             f"({large['ppl']} vs {small['ppl']}), by {gap:.3f}: less than either figure's error, "
                             "so perplexity cannot rank these two on this text. KLD and top-1 against the source, "
                             "on the same tokens, are the finer comparison.")
    return notes


def converter_desc(converter: str | None) -> str:
    """The converter's identity (llamacpp.converter_version) as a sentence: a release's or a checkout's."""
    if not converter:
        return "llama.cpp's convert_hf_to_gguf.py"
    kind, _, version = converter.partition("==")
    if kind == "llama-cpp-python" and version:
        return f"`convert_hf_to_gguf.py` from the same release's source (llama-cpp-python {version})"
    revision = converter.removeprefix("checkout:")
    return f"`convert_hf_to_gguf.py` from llama.cpp at `{revision}`"


def _imatrix_desc(by_type: dict[str, dict[str, Any]]) -> str | None:
    """type -> the imatrix record of its quantize step; None when no file used one."""
    if not by_type:
        return None
    first = next(iter(by_type.values()))
    return (f"{', '.join(by_type)} {'was' if len(by_type) == 1 else 'were'} quantized with one, covering "
            f"{first['tensors']} weight matrices, computed on {calibration_desc(first.get('calibration'))}")


def _imatrix_file(out: StepOutput) -> dict[str, Any]:
    d = out.data
    return {"name": d["file"], "entries": d["entries"],
            "calibration": f"`{d['dataset']}`, {d['chunks']} chunks of {d['chunk_size']} tokens"}


def search_line(search: dict[str, Any] | None) -> str | None:
    """How a searched variant's types were chosen, in a sentence (gguf_allocation.py)."""
    if not search:
        return None
    return (f"Types searched within {budget_words(search['budget'])}: {search['groups']} groups of tensors "
            "(a kind of tensor in a band of layers), each quantized alone and measured against the full-precision "
            f"file on calibration windows (never the evaluation's), {search['runs']} quantize+evaluate runs in "
            f"{search['search_seconds']:g} s; then the mix with the least predicted KL divergence that fits.")


def variant_rows(repo_id: str, model: str, artifacts: dict[str, tuple[StepOutput, StepOutput]],
                 imatrix_file: str | None) -> list[dict[str, Any]]:
    """One entry per variant: its recipe, what each rule set, how it compares with the stock frontier (its
    gate's record) and the llama-quantize command line that makes it from the converter's output."""
    out = []
    for name, (quant, gate) in artifacts.items():
        applied = quant.data.get("recipe")
        if not applied:
            continue
        recipe = Recipe.from_params(applied)
        front = gate.data.get("frontier") or {}
        expected, kld = front.get("frontier_kld"), gate.data.get("kld_mean")
        if expected and kld is not None:
            between = " – ".join(p["name"] for p in (front.get("below"), front.get("above")) if p)
            frontier = f"{format_kld(expected)} ({between})"
            versus = format_pct(kld / expected - 1, digits=0)
        else:
            frontier, versus = "none smaller", "-"
        out.append({
            "name": name, "recipe": recipe.describe(), "size": format_size(quant.data["size"]),
            "kld": format_kld(kld) if kld is not None else "-", "frontier": frontier, "versus": versus,
            "rules": [{"rule": r["rule"] if r["rule"] in ("output", "embeddings") else f"`{r['rule']}`",
                       "type": r["type"], "count": len(r["tensors"]),
                       "tensors": ", ".join(sorted(r["tensors"])[:4]) + (", …" if len(r["tensors"]) > 4 else ""),
                       "fell_back": sorted({t for t in r["tensors"].values() if t != r["type"]})}
                      for r in applied.get("applied", [])],
            "command": recipe.command(f"{model}-F16.gguf", quant.data["file"],
                                      imatrix_file if quant.data.get("imatrix") else None),
            "tag": f"{repo_id}:{name}",
            "search": search_line(applied.get("search")),
        })
    return out
