"""The publish step: a format's verified artifacts, its card and quantforge.json into one repo. One publisher per
destination kind, chosen by `publish.to` (publish/publisher.py):

    hub        the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN / hf auth login)       (publish/hub.py)
    dir:PATH   a folder laid out like Hub repos: PATH/<namespace>/<repo>/...   (publish/localdir.py)

A publisher gets the repo id and the files (name -> local path, with sha256) and makes the destination hold
exactly those bytes, skipping files already there with the same hash. Which files an artifact puts in its repo,
and what its card says, the artifact's format decides (looked up in the format registry, never imported here).
To the Hub, each artifact's files are uploaded ahead, as soon as its gate has passed (publish/upload.py), and the
publish step commits them by their records, reading only the artifacts' data: `--evict` need not keep them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..card import CARD_FILE, card_template_version, release_info, repo_id, source_card
from ..config.destination import DIR_PREFIX, Destination
from ..config.schema import ModelTarget, Targets, is_local_source
from ..core.formats import BuiltArtifact, CardInputs, Publishable, ReleaseInfo, format_named
from ..core.registry import Estimates, kind_info, step_kind
from ..core.staleness import upstream_keys
from ..core.step import Step, StepContext, StepOutput
from ..data import portable_path
from ..errors import PreuploadRejected, PublishError
from ..steps.disk import SourceSize, output_bytes
from ..steps.rates import COPY_RATE
from ..store import sha256_file
from ..toolchains.llamacpp import cache_root
from .destinations import destination, publisher_for
from .published import check_published, forget_repo, previous_manifest, published_record
from .record import (
    REPO_MANIFEST,
    file_entries,
    known_blobs,
    public_data,
    recorded_files,
    removed_files,
    step_record,
)
from .upload import upload_again, uploaded_files, uploads_by_artifact

if TYPE_CHECKING:
    from .publisher import PreuploadedFile

log = logging.getLogger(__name__)


def publish_step(model: ModelTarget, fmt: str, publishable: list[Publishable], source: Step, tokens: Step,
                 targets: Targets, extras: Sequence[Step] = (), uploads: Sequence[Step] = ()) -> Step:
    """extras: the format's steps whose files the repo holds once (PlannedFormat.extras); uploads: the artifacts'
    uploads to the Hub (upload.upload_steps), committed here: then only the artifacts' data is read."""
    to, where = model.publish.to, Destination()
    if (folder := model.publish.folder) is not None:
        # the key holds the folder as written (relative to the targets file); the run uses it resolved here
        to, where = f"{DIR_PREFIX}{portable_path(folder)}", Destination(targets.resolve_path(folder))
    inputs: dict[str, Step] = {}
    for item in publishable:
        inputs[f"artifact:{item.name}"] = item.artifact
        inputs[f"check:{item.name}"] = item.gate
    for upload in uploads:
        inputs[f"upload:{_artifact_name(upload)}"] = upload
    for extra in extras:
        inputs[f"extra:{extra.kind}"] = extra
    inputs["source"] = source
    inputs["tokens"] = tokens  # the evaluation's text and windows, described in the card
    # What is read of the inputs only as data (so a destination's record of them serves): the measurements, the
    # source's facts, the windows' description; to the Hub also the artifacts and extras, whose files went up
    # ahead (or already are there): a changed gate or card re-publishes without rebuilding or re-uploading them
    data_only = {"source", "tokens", *(f"check:{item.name}" for item in publishable)}
    if uploads:
        data_only |= {role for role, dep in inputs.items() if role.startswith(("artifact:", "upload:", "extra:"))}
    # the model tree, the licence and the model's other repos from this build: the cards link them
    release = replace(release_info(model), siblings=tuple((other, repo_id(model, other))
                                                          for other in model.formats.enabled() if other != fmt))
    return Step(kind="publish", label=f"{model.name}/{fmt}:publish",
                params={"to": to, "repo_id": repo_id(model, fmt),
                        "private": model.publish.private, "format": fmt, "namespace": model.publish.namespace,
                        "max_file_size": model.publish.max_file_bytes, "release": asdict(release)},
                inputs=inputs, tools={"card-template": card_template_version(format_named(fmt).card_template)},
                model=model.name, fmt=fmt, local={"to": where}, data_only=frozenset(data_only))


def built_artifacts(step: Step, inputs: dict[str, StepOutput]) -> list[tuple[Step, StepOutput, StepOutput]]:
    """(artifact step, its output, its gate's output) for each artifact a publish step publishes, in order."""
    gates = {(dep.fmt, dep.qtype): inputs[role] for role, dep in step.inputs.items()
             if kind_info(dep.kind).stage == "gate"}
    return [(dep, inputs[role], gates[(dep.fmt, dep.qtype)]) for role, dep in step.inputs.items()
            if kind_info(dep.kind).stage == "artifact"]


def built_extras(step: Step, inputs: dict[str, StepOutput]) -> tuple[StepOutput, ...]:
    """The outputs of the format's extra steps (the files its repo holds once), in order."""
    return tuple(inputs[role] for role, dep in step.inputs.items() if kind_info(dep.kind).stage == "extra")


def _release(step: Step) -> ReleaseInfo:
    release = dict(step.params.get("release") or {})
    siblings = tuple((fmt, repo) for fmt, repo in release.pop("siblings", ()))
    return ReleaseInfo(**release, siblings=siblings)


def _artifact_name(artifact: Step) -> str:
    return artifact.qtype or artifact.fmt


def _copied(step: Step, size: SourceSize) -> tuple[Path, int] | None:
    """To a folder, every file is copied; to the Hub, the uploads ahead of the commit did the work."""
    folder = destination(step).folder
    return None if folder is None else (folder, sum(output_bytes(d, size) for d in step.inputs.values()))


def _copy_seconds(step: Step, size: SourceSize, cores: int, gpu: bool) -> float:
    return copied[1] / COPY_RATE if (copied := _copied(step, size)) else 0.0


@step_kind("publish", version="3", stage="publish", estimates=Estimates(seconds=_copy_seconds, copied_bytes=_copied),
           check=lambda step, manifest, verify=False: check_published(step, manifest, verify),
           published=lambda step, verify=False: published_record(step, verify))
def run_publish(step: Step, ctx: StepContext) -> dict[str, Any]:
    source = ctx.inputs["source"]
    fmt = format_named(step.params["format"])
    built: list[BuiltArtifact] = []
    artifacts: dict[str, dict[str, Any]] = {}
    artifact_files: dict[str, tuple[Path, str]] = {}
    ahead: dict[str, PreuploadedFile] = {}  # uploaded by the upload steps: committed by their records
    uploads = uploads_by_artifact(step, ctx.inputs)
    for artifact, out, gate in built_artifacts(step, ctx.inputs):
        name = _artifact_name(artifact)
        if artifact.label in uploads:
            files, sent = uploaded_files(uploads[artifact.label])
            ahead.update(sent)
        else:
            files = fmt.published_files(out, ctx.out_dir, step.params["max_file_size"])
        artifact_files.update(files.files)
        built.append(BuiltArtifact(name, out, gate, files.shards))
        artifacts[name] = {"artifact": public_data({k: v for k, v in out.data.items() if k != "tensor_types"}),
                           "check": public_data(gate.data), **({"sha256": files.sha256} if files.sha256 else {}),
                           **({"shards": list(files.shards)} if files.shards else {})}
    card = _card_inputs(step, ctx.inputs, built)
    repo_files = fmt.repo_files(card, ctx.out_dir)
    previous = previous_manifest(step)
    made = {**artifact_files, **{f.name: (f.path, f.sha256) for f in repo_files}}
    made_entries = file_entries(made, {name: f.sha256 for name, f in ahead.items()}, previous)
    for name, file in ahead.items():  # sizes, as for the files here: what plan and build compare a copy with
        made_entries[name]["size"] = file.size
    # a type no longer declared: its files go in the same commit, unless --keep-removed (then they stay listed)
    removed = removed_files(previous, made_entries)
    if ctx.options.keep_removed:
        made_entries.update({name: recorded_files(previous)[name] for name in removed})
        removed = []
    card = replace(card, removed=tuple(removed))
    release = {k: v for k, v in asdict(card.release).items() if v}
    manifest = {
        "quantforge": __version__,
        "model": step.model,
        "format": step.params["format"],
        # a Hub source by its repo id and commit; a local one by its content digest alone (never its folder)
        "source": {"source": source.params["source"], "commit": source.data.get("commit")}
                  if "digest" not in source.params
                  else {"digest": source.params["digest"]},
        **({"release": release | {"siblings": dict(card.release.siblings)}} if release else {}),
        "artifacts": artifacts,
        **({"repo_files": {f.name: {"sha256": f.sha256, **public_data(f.about)} for f in repo_files}}
           if repo_files else {}),
        # the nightly's memory: the key of this publish step (it covers everything upstream) and of each step it
        # was made from, so that a run with no work dir can tell the repo is up to date, or say what changed; and
        # what each of those steps left, so that such a run can reuse their data (publish/record.py)
        "build": {"key": step.key, "steps": upstream_keys(step),
                  "records": {label: step_record(out) for label, out in sorted(ctx.upstream().items())}},
    }
    card_file = ctx.out_dir / CARD_FILE
    card_file.write_text(fmt.render_card(card), encoding="utf-8")
    # a folder gets its card last: the record counts only beside this very card (a publish cut short does not)
    manifest["build"]["card_sha256"] = sha256_file(card_file)
    manifest["files"] = made_entries
    manifest_file = ctx.out_dir / REPO_MANIFEST
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _refuse_local_paths([manifest_file, card_file, *(f.path for f in repo_files if f.path.parent == ctx.out_dir)],
                        source.data.get("path"), ctx.log_path)
    files = {**made, REPO_MANIFEST: (manifest_file, sha256_file(manifest_file)),
             CARD_FILE: (card_file, sha256_file(card_file))}
    publisher = publisher_for(destination(step))
    commit = source.data.get("commit") or source.params.get("digest", "")
    try:
        result = publisher.publish(step.params["repo_id"], files, private=step.params["private"],
                                   message=f"quantforge {__version__}: {step.params['format']} of {step.model} "
                                           f"@ {commit[:12]}", preuploaded=ahead, delete=removed,
                                   blobs=known_blobs(manifest["files"]))
    except PreuploadRejected as exc:
        exc.hint = upload_again(step, ctx.inputs, exc.names)
        raise
    # what was read of the destination before this publish is old
    forget_repo(step)
    return {"repo_id": step.params["repo_id"], "to": step.params["to"],
            "files": {**{name: sha for name, (_, sha) in files.items()},
                      **{name: file.sha256 for name, file in ahead.items()}},
            # what plan and build check the published copy against (publish/copies.py)
            "sizes": {name: size for name, (path, _) in files.items()
                      if (size := path.stat().st_size if path.is_file() else made_entries.get(name, {}).get("size"))}
                     | {name: file.size for name, file in ahead.items()},
            **({"removed": removed} if removed else {}), **result.to_json()}


def _card_inputs(step: Step, inputs: dict[str, StepOutput], built: list[BuiltArtifact]) -> CardInputs:
    return CardInputs(repo_id=step.params["repo_id"], model=step.model, namespace=step.params["namespace"],
                      source=inputs["source"], tokens=inputs.get("tokens"), artifacts=tuple(built),
                      release=_release(step), extras=built_extras(step, inputs))


def _private_locations(source_dir: str | Path | None, log_path: Path) -> dict[str, str]:
    """Directories a published repo must not name: the source folder (when it is on this machine), the work dir
    (logs/ is in it), the converter cache, and the home folder when it names a user (/home/alice; a bare /root
    says nothing)."""
    places = {"work dir": log_path.parent.parent, "quantforge cache": cache_root(),
              **({"source folder": Path(source_dir)} if source_dir else {})}
    home = Path.home()
    if len(home.parts) >= 3:
        places["home folder"] = home
    return {what: str(path.resolve()) for what, path in places.items()}


def _refuse_local_paths(files: list[Path], source_dir: str | Path | None, log_path: Path) -> None:
    """The last check before anything leaves: a generated file naming a local directory is a bug to fix, not a
    thing to publish."""
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        for what, place in _private_locations(source_dir, log_path).items():
            if place in text:
                raise PublishError(f"{file.name} would publish a local path (the {what}, {place}); nothing was "
                                   "published")


def render_card(step: Step, inputs: dict[str, StepOutput]) -> str:
    """The repo's model card from the outputs of a publish step's inputs, without publishing (`quantforge card`,
    which does not split: there, a file over the size limit is listed whole, unless an upload split it)."""
    uploads = uploads_by_artifact(step, inputs)
    built = [BuiltArtifact(_artifact_name(artifact), out, gate,
                           tuple(uploads[artifact.label].data.get("shards", ())) if artifact.label in uploads else ())
             for artifact, out, gate in built_artifacts(step, inputs)]
    return format_named(step.params["format"]).render_card(_card_inputs(step, inputs, built))


def release_warnings(targets: Targets) -> list[str]:
    """What `quantforge validate` warns of: repos that would publish without a base model (the Hub's model tree)
    or a licence. A Hub source is its own base model and its card's licence is used, which only a download can
    check; a local folder needs them declared, or (the licence) in its own README.md."""
    warnings = []
    for model in targets.models:
        release = release_info(model)
        missing = [] if release.base_model else ["base_model"]
        if not release.license and is_local_source(model.source):
            meta, _ = source_card(targets.resolve_path(model.source))
            if not meta.get("license"):
                missing.append("license")
        if missing:
            repos = ", ".join(repo_id(model, fmt) for fmt in model.formats.enabled())
            warnings.append(f"{model.name}: {repos} would publish without {' or '.join(missing)}; declare "
                            + " and ".join({"base_model": "base_model: ORG/NAME (the Hub repo it is a copy of)",
                                            "license": "license: a Hub licence id such as apache-2.0"}[m]
                                           for m in missing))
    return warnings
