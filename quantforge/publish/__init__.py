"""Publishing verified artifacts. One publisher per destination kind, chosen by `publish.to`:

    hub        the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN / hf auth login)       (publish/hub.py)
    dir:PATH   a folder laid out like Hub repos: PATH/<namespace>/<repo>/...   (publish/localdir.py)

A publisher gets the repo id and the files (name -> local path, with sha256) and makes the destination hold
exactly those bytes, skipping files already there with the same hash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import __version__
from ..card import CARD_FILE, card_template_version

__all__ = ["CARD_FILE", "REPO_MANIFEST", "Publisher", "publish_step", "render_card", "run_publish"]
from ..config import ModelTarget, Targets
from ..errors import PublishError
from ..plan import Step
from ..store import sha256_file
from ..toolchains.gguf_split import parse_size, split_gguf

if TYPE_CHECKING:
    from ..engine import StepContext, StepOutput

log = logging.getLogger(__name__)

REPO_MANIFEST = "quantforge.json"  # source commit, parameters, metrics, file hashes: the basis for skip-unchanged


class Publisher(Protocol):
    def publish(self, repo_id: str, files: dict[str, tuple[Path, str]], *, private: bool,
                message: str) -> dict[str, Any]:
        """Make the repo hold `files` (name -> (path, sha256)); return what was uploaded and what was kept."""
        ...

    def missing(self, repo_id: str, files: dict[str, str]) -> list[str]:
        """Names of `files` (name -> sha256) the destination does not hold with that hash."""
        ...


def publisher_for(to: str) -> Publisher:
    kind, _, where = to.partition(":")
    if kind == "hub":
        from .hub import HubPublisher

        return HubPublisher()
    if kind == "dir":
        from .localdir import LocalDirPublisher

        return LocalDirPublisher(Path(where))
    raise ValueError(f"unknown publisher {to!r}")  # the schema rejects these first


def publish_step(model: ModelTarget, fmt: str, publishable: dict[str, tuple[Step, Step]], source: Step,
                 tokens: Step, targets: Targets) -> Step:
    to = model.publish.to
    if to.startswith("dir:"):
        to = f"dir:{targets.resolve_path(to[4:])}"
    inputs: dict[str, Step] = {}
    for name, (artifact, check) in publishable.items():
        inputs[f"artifact:{name}"] = artifact
        inputs[f"check:{name}"] = check
    inputs["source"] = source
    inputs["tokens"] = tokens  # the evaluation's text and windows, described in the card
    return Step(kind="publish", label=f"{model.name}/{fmt}:publish",
                params={"to": to, "repo_id": f"{model.publish.namespace}/{model.publish.repo_name(model.name, fmt)}",
                        "private": model.publish.private, "format": fmt, "namespace": model.publish.namespace,
                        "max_file_size": parse_size(model.publish.max_file_size)},
                inputs=inputs, tools={"card-template": card_template_version(fmt)}, model=model.name, fmt=fmt)


def _artifacts(inputs: dict[str, StepOutput]) -> dict[str, tuple[StepOutput, StepOutput]]:
    """name -> (the artifact's step output, its gate's output), from a publish step's inputs."""
    return {role.split(":", 1)[1]: (out, inputs["check:" + role.split(":", 1)[1]])
            for role, out in inputs.items() if role.startswith("artifact:")}


def _artifact_files(artifacts: dict[str, tuple[StepOutput, StepOutput]], out_dir: Path, max_file_size: int
                    ) -> tuple[dict[str, tuple[Path, str]], dict[str, list[str]]]:
    """The files to publish, with any over the size limit split into llama.cpp shards; and the shard names."""
    files: dict[str, tuple[Path, str]] = {}
    shards: dict[str, list[str]] = {}
    for name, (out, _) in artifacts.items():
        if "dir" in out.data:  # a checkpoint folder (GPTQ, AWQ): its files go to the repo's root
            prefix = out.data["dir"] + "/"
            files.update({rel[len(prefix):]: (out.file(rel), meta["sha256"]) for rel, meta in out.files().items()
                          if rel.startswith(prefix)})
            continue
        file = out.data["file"]
        if out.files()[file]["size"] <= max_file_size:
            files[file] = (out.file(file), out.files()[file]["sha256"])
            continue
        parts = split_gguf(out.file(file), out_dir, max_file_size)
        shards[name] = [p.name for p in parts]
        files.update({p.name: (p, sha256_file(p)) for p in parts})
    return files, shards


def run_publish(step: Step, ctx: StepContext) -> dict[str, Any]:
    source = ctx.inputs["source"]
    built = _artifacts(ctx.inputs)
    artifacts: dict[str, dict[str, Any]] = {
        name: {"artifact": {k: v for k, v in out.data.items() if k != "tensor_types"}, "check": gate.data,
               **({"sha256": out.files()[out.data["file"]]["sha256"]} if "file" in out.data else {})}
        for name, (out, gate) in built.items()}
    manifest = {
        "quantforge": __version__,
        "model": step.model,
        "format": step.params["format"],
        "source": {k: source.manifest["params"].get(k) for k in ("source", "commit", "digest")
                   if source.manifest["params"].get(k)},
        "artifacts": artifacts,
    }
    artifact_files, shards = _artifact_files(built, ctx.out_dir, step.params["max_file_size"])
    for name, parts in shards.items():
        artifacts[name]["shards"] = parts
    manifest_file = ctx.out_dir / REPO_MANIFEST
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    card_file = ctx.out_dir / CARD_FILE
    card_file.write_text(render_card(step, ctx.inputs, shards), encoding="utf-8")
    files = {**artifact_files, REPO_MANIFEST: (manifest_file, sha256_file(manifest_file)),
             CARD_FILE: (card_file, sha256_file(card_file))}
    publisher = publisher_for(step.params["to"])
    commit = source.manifest["params"].get("commit") or source.manifest["params"].get("digest", "")
    result = publisher.publish(step.params["repo_id"], files, private=step.params["private"],
                               message=f"quantforge {__version__}: {step.params['format']} of {step.model} "
                                       f"@ {commit[:12]}")
    return {"repo_id": step.params["repo_id"], "to": step.params["to"],
            "files": {name: sha for name, (_, sha) in files.items()}, **result}


def render_card(step: Step, inputs: dict[str, StepOutput], shards: dict[str, list[str]] | None = None) -> str:
    """The repo's model card, from the outputs of the publish step's inputs (also used by `quantforge card`,
    which does not split: there, a file over the size limit is listed whole)."""
    from ..card import render_checkpoint_card, render_gguf_card

    common = {"repo_id": step.params["repo_id"], "model": step.model, "namespace": step.params["namespace"],
              "source": inputs["source"], "artifacts": _artifacts(inputs), "tokens": inputs.get("tokens")}
    if step.params["format"] == "gguf":
        return render_gguf_card(**common, shards=shards or {})
    return render_checkpoint_card(**common, fmt=step.params["format"])


def check_published(step: Step, manifest: dict[str, Any]) -> str | None:
    files = manifest.get("data", {}).get("files", {})
    try:
        missing = publisher_for(step.params["to"]).missing(step.params["repo_id"], files)
    except (OSError, PublishError) as exc:
        # unreachable destination: trust the record rather than fail `plan` (the next push re-checks hashes)
        log.warning("%s: cannot check the published copy (%s)", step.label, exc)
        return None
    return f"published copy changed or missing: {', '.join(missing)}" if missing else None
