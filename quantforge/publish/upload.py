"""Uploading to the Hub ahead of the commit: each artifact's files go up as soon as its gate has passed, so that
`build --evict` can delete the artifact before the next one is made; the publish step then commits them all,
with the card and quantforge.json, in one commit. A repo is still published whole or not at all, and never holds
a file that failed its gate (a failed gate skips its upload).

    <format>.quantize ─► verify, evaluate ─► gate ┄► publish.upload ─┐   (with --evict, the artifact goes here)
    ...every other artifact the same way...                          ├─► publish (one commit; reads only the
    <format>.quantize ────────────────────────────────────────────────┘    artifacts' recorded data)

An upload waits for its gate (Step.after) but is keyed by its artifact alone: a changed gate uploads nothing again.
An upload step records, for each file the artifact puts in its repo, what a commit needs without the local file
(hub.PreuploadedFile: sha256, size, the first 512 bytes). A file the Hub keeps as a regular git file (a
checkpoint's small config and tokenizer files) is kept in the step's output, since a commit carries its bytes.
Split shards are written to a scratch folder in the output and deleted once uploaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..card import repo_id
from ..config.schema import ModelTarget
from ..core.formats import Publishable, PublishedArtifact, format_named
from ..core.registry import Estimates, step_kind
from ..core.step import Step, StepContext, StepOutput
from ..steps.disk import SourceSize, output_bytes
from ..steps.rates import HASH_RATE, UPLOAD_RATE
from .record import git_blob_sha1

if TYPE_CHECKING:
    from .publisher import PreuploadedFile

UPLOAD_KIND = "publish.upload"
SCRATCH = "scratch"  # split shards, deleted once uploaded
KEPT = "regular"  # copies of the files the Hub keeps as regular git files


def upload_steps(model: ModelTarget, fmt: str, publishable: Sequence[Publishable]) -> list[Step]:
    """One upload per artifact of a model publishing to the Hub (none for a folder), each reading the artifact
    and needing its gate to have passed."""
    if model.publish.to != "hub":
        return []
    return [Step(kind=UPLOAD_KIND, label=f"{item.artifact.artifact}:upload",
                 params={"repo_id": repo_id(model, fmt), "private": model.publish.private, "format": fmt,
                         "max_file_size": model.publish.max_file_bytes},
                 inputs={"artifact": item.artifact}, after=(item.gate,),
                 model=model.name, fmt=fmt, qtype=item.artifact.qtype)
            for item in publishable]


def _split_bytes(step: Step, size: SourceSize) -> int:
    """An artifact over the size limit is split into shards, uploaded and deleted before the commit."""
    whole = output_bytes(step.inputs["artifact"], size)
    return whole if whole > step.params["max_file_size"] else 0


UPLOAD_COSTS = Estimates(scratch_bytes=_split_bytes, seconds=lambda step, size, cores, gpu:
                         output_bytes(step.inputs["artifact"], size) * (1 / UPLOAD_RATE + 1 / HASH_RATE))


# 2: waits for its gate without being keyed by it (a changed gate uploads nothing again); kept files' blob ids
@step_kind(UPLOAD_KIND, version="2", stage="publish", estimates=UPLOAD_COSTS)
def run_upload(step: Step, ctx: StepContext) -> dict[str, Any]:
    from .hub import HubPublisher

    scratch = ctx.out_dir / SCRATCH
    scratch.mkdir()
    try:
        made = format_named(step.params["format"]).published_files(ctx.inputs["artifact"], scratch,
                                                                   step.params["max_file_size"])
        sent = HubPublisher().preupload(step.params["repo_id"], made.files, private=step.params["private"])
        files: dict[str, dict[str, Any]] = {}
        for name, record in sent.items():
            if record is None:  # a regular git file: keep its bytes for the commit
                kept = ctx.out_dir / KEPT / name
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(made.files[name][0], kept)
                files[name] = {"sha256": made.files[name][1], "kept": f"{KEPT}/{name}", "blob": git_blob_sha1(kept)}
            else:
                files[name] = {**record.to_json(), "lfs": True}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"repo_id": step.params["repo_id"], "files": files, **({"sha256": made.sha256} if made.sha256 else {}),
            **({"shards": list(made.shards)} if made.shards else {})}


def uploads_by_artifact(step: Step, inputs: dict[str, StepOutput]) -> dict[str, StepOutput]:
    """A publish step's upload outputs, by the label of the artifact each uploaded."""
    return {dep.inputs["artifact"].label: inputs[role] for role, dep in step.inputs.items()
            if dep.kind == UPLOAD_KIND}


def uploaded_files(upload: StepOutput) -> tuple[PublishedArtifact, dict[str, PreuploadedFile]]:
    """What an upload step leaves for the commit: its kept regular files (as published_files gives them) and the
    LFS objects it sent ahead."""
    from .publisher import PreuploadedFile

    kept, ahead = {}, {}
    for name, info in upload.data["files"].items():
        if info.get("lfs"):
            ahead[name] = PreuploadedFile.from_json(info)
        else:
            kept[name] = (upload.file(info["kept"]), info["sha256"])
    shards = tuple(upload.data.get("shards", ()))
    return PublishedArtifact(kept, sha256=upload.data.get("sha256"), shards=shards), ahead


def upload_again(publish: Step, inputs: dict[str, StepOutput], names: list[str]) -> str:
    """What to do when the Hub no longer holds files uploaded ahead (errors.PreuploadRejected): delete the outputs
    of the uploads that sent them, and the next build makes them again (rebuilding an evicted artifact first)."""
    culprits = sorted((dep.label, str(inputs[role].dir)) for role, dep in publish.inputs.items()
                      if dep.kind == UPLOAD_KIND and set(inputs[role].data.get("files", {})) & set(names))
    return (f"upload them again: delete the output of {', '.join(label for label, _ in culprits)} "
            f"(rm -r {' '.join(folder for _, folder in culprits)}) and build again")
