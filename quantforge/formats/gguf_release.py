"""What a GGUF release carries beyond the quantized tensors: provenance inside every file, and the files its repo
holds once (the importance matrix in llama.cpp's imatrix GGUF format, Ollama's sampling `params`).

Inside each file (nothing local: no path, no user or cache directory):
    conversion (the converter's --metadata)   general.name, general.quantized_by, general.repo_url,
                                              general.base_model.*, general.source.repo_url, general.license.name/link
    quantization (llama.cpp's kv overrides)   general.license, quantforge.* (quantforge and llama.cpp versions, the
                                              source revision) and, for a matrix-weighted file, llama.cpp's own
                                              quantize.imatrix.file / .dataset / .chunks_count (+ .entries_count)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .. import __version__
from ..card import GENERATION_CONFIG, hub_url, repo_id, source_facts
from ..config.schema import ModelTarget
from ..core.formats import CardInputs, ReleaseInfo, RepoFile
from ..core.step import Step, StepOutput
from ..steps.source import content_digest
from ..store import sha256_file
from ..toolchains import imatrix_gguf
from .gguf_chart import CHART_FILE, render_chart
from .gguf_frontier import published_points

IMATRIX_FILE_KIND = "gguf.imatrix_file"
INTERMEDIATE_FILE = "intermediate.gguf"  # the converter's full-precision output every type is quantized from
OLLAMA_PARAMS_FILE = "params"  # Ollama reads a repo's `params` (JSON) when it runs hf.co/<repo>
# generation_config.json's sampling fields -> Ollama's parameter names (its Modelfile PARAMETERs)
OLLAMA_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "typical_p": "typical_p", "repetition_penalty": "repeat_penalty"}


def imatrix_file_name(model: str) -> str:
    return f"{model}-imatrix.gguf"


def convert_metadata(model: ModelTarget, release: ReleaseInfo) -> dict[str, Any]:
    """The converter's --metadata: what the files were made from. Only what belongs to the source, so that two
    models (or two namespaces) made from one source share one conversion; who published the files and where is
    written at quantization (quantize_metadata). The name is passed explicitly, since the converter would
    otherwise guess it from the source folder's name (a commit sha for a Hub snapshot)."""
    meta: dict[str, Any] = {"general.name": model.source.rstrip("/").rsplit("/", 1)[-1]}
    if release.base_model:
        org, _, name = release.base_model.partition("/")
        meta["general.base_models"] = [{"name": name, "organization": org, "repo_url": hub_url(release.base_model)}]
        meta["general.source.repo_url"] = hub_url(release.base_model)
    # the converter takes general.license itself only from the model card: quantization sets it (quantize_metadata)
    if release.license_name:
        meta["general.license.name"] = release.license_name
    if release.license_link:
        meta["general.license.link"] = release.license_link
    return meta


def quantize_metadata(model: ModelTarget, release: ReleaseInfo, source: Step, imatrix: tuple[str, str, int] | None
                      ) -> dict[str, Any]:
    """The keys quantization writes that are known when planning (and so are part of the step's key): the model's
    name, who published it where, the declared licence, the source revision, and for a matrix-weighted file
    llama-quantize's quantize.imatrix.* keys. imatrix: (published file name, dataset name as published, chunks)."""
    kv: dict[str, Any] = {"general.name": model.name, "general.quantized_by": model.publish.namespace}
    repo_url = hub_url(repo_id(model, "gguf"))
    if len(repo_url.encode()) <= 127:  # llama.cpp's string overrides hold 127 bytes; the card names the repo anyway
        kv["general.repo_url"] = repo_url
    if release.license:
        kv["general.license"] = release.license
    # the Hub repo itself is in general.source.repo_url (conversion): a repo id may exceed an override's 127 bytes.
    # The source by its content digest, not its commit (the card names the commit): a commit that changes no file
    # a build reads requantizes nothing. The key's name predates that; a local source's value is as it was.
    kv["quantforge.source.revision"] = content_digest(source)
    if imatrix is not None:
        kv.update(imatrix_gguf.quantize_kv(*imatrix))
    return kv


def build_metadata(planned: dict[str, Any], libllama: str, converter: str | None) -> dict[str, Any]:
    """The planned keys plus the versions that made the file. quantforge's own version is written as it is but is
    not part of the key: a new quantforge release does not requantize, and a file says which one made it."""
    return {**planned, "quantforge.version": __version__, "quantforge.llama_cpp": f"llama-cpp-python=={libllama}",
            **({"quantforge.converter": converter} if converter else {})}


# ------------------------------------------------------------------------------------ files beside the GGUFs

def sampling_defaults(source: StepOutput) -> dict[str, float | int]:
    """The sampling values the source's generation_config.json recommends (only those it sets). Nothing when it
    asks for greedy decoding (do_sample: false), where they would not apply."""
    config = source_facts(source).generation_config
    if config.get("do_sample") is False:
        return {}
    found: dict[str, float | int] = {}
    for key in OLLAMA_NAMES:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            continue
        if key == "top_k" and (value <= 0 or value != int(value)):  # 0 means "off" in transformers
            continue
        found[key] = int(value) if key == "top_k" else value
    return found


def ollama_params(sampling: dict[str, float | int]) -> dict[str, float | int]:
    return {OLLAMA_NAMES[k]: v for k, v in sampling.items()}


def imatrix_files(extras: tuple[StepOutput, ...]) -> list[StepOutput]:
    return [out for out in extras if out.manifest.get("kind") == IMATRIX_FILE_KIND]


def repo_files(card: CardInputs, scratch: Path) -> tuple[RepoFile, ...]:
    """The importance matrix (when the files used one), Ollama's params (when the source recommends sampling
    values) and, when the repo has a variant, the chart of mean KLD against size (gguf_chart.py), each once."""
    files = []
    for out in imatrix_files(card.extras):
        name = out.data["file"]
        files.append(RepoFile(name, out.file(name), out.files()[name]["sha256"], {
            "what": "importance matrix (llama.cpp imatrix GGUF)",
            **{k: out.data[k] for k in ("entries", "chunks", "chunk_size", "dataset")}}))
    params = ollama_params(sampling_defaults(card.source))
    if params:
        path = scratch / OLLAMA_PARAMS_FILE
        path.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        files.append(RepoFile(OLLAMA_PARAMS_FILE, path, sha256_file(path), {
            "what": f"Ollama sampling parameters, from the source's {GENERATION_CONFIG}", "params": params}))
    stock, variants = published_points({a.name: (a.output, a.gate) for a in card.artifacts})
    if variants:
        chart = render_chart(stock, variants, scratch / CHART_FILE, f"{card.model}: mean KL divergence against size")
        files.append(RepoFile(CHART_FILE, chart, sha256_file(chart), {
            "what": "mean KL divergence from the source against file size, with the stock frontier",
            "points": {p.name: {"size": p.size, "kld_mean": p.kld, "variant": p in variants}
                       for p in [*stock, *variants]}}))
    return tuple(files)
