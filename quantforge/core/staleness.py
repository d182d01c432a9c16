"""Why a step must run, as data: cheapest checks first, shared by `plan` and `build`.

The work dir is asked first. A step it does not hold may still be up to date where its output lives outside the
work dir: a publish step whose destination's record (quantforge.json) carries its key has nothing to do, and then
nothing upstream of it has either. That record is what a nightly run with a fresh work dir judges by.

The record also keeps what each step upstream left (kind, key, params, data, file hashes; no files): a step whose
key it holds is *recorded*. Like an evicted output, a recorded one serves the steps that read only its data
(Step.data_only), so that on a fresh runner a changed gate re-judges the recorded measurements, a new type builds
only what it needs, and a new card template re-renders the card, none of them downloading the source or
uploading an artifact again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..store import WorkDir
from .registry import kind_info
from .step import Published, Reason, Step


def stale_reasons(step: Step, work: WorkDir, *, remote: bool = True, verify: bool = False) -> list[Reason]:
    """Why `step` must run; empty when its output is in the cache (and, where the kind can tell, still holds), or
    when (`remote`) the destination's record says it was published with this very key and holds what it lists.
    `verify`: the kinds' thorough checks (content, not only sizes)."""
    manifest = work.lookup(step.kind, step.key)
    if manifest is not None:
        check = kind_info(step.kind).check
        return list(check(step, manifest, verify)) if check else []
    record = published_record(step, verify) if remote else None
    if record is not None and record.key == step.key:
        return list(record.problems)
    last = work.last_state(step.label)
    if last is None:
        # no local history: the published record says what changed since, when there is one
        return since_published(step, record) if record is not None else [Reason("never-built")]
    if last.get("key") == step.key:
        return [Reason("output-missing")]
    now = step.fingerprint()
    reasons = []
    for table in ("params", "tools"):
        before, after = last.get(table, {}), now[table]
        reasons += [Reason(table, k, before.get(k), after.get(k)) for k in sorted(set(after) | set(before))
                    if before.get(k) != after.get(k)]
    reasons += [Reason("input", role) for role in sorted(now["inputs"])
                if last.get("inputs", {}).get(role) != now["inputs"][role]]
    return reasons or [Reason("inputs")]


def moved(step: Step, manifest: dict[str, Any], verify: bool = False) -> list[Reason]:
    """The check of a step that records where a file outside the work dir is (step.local["path"], unkeyed: the
    key is its content): run again, cheaply, when the same content is now elsewhere, so what reads it finds it."""
    where = step.local.get("path")
    return [Reason("moved", new=where)] if manifest.get("data", {}).get("path") != where else []


def published_record(step: Step, verify: bool = False) -> Published | None:
    """The destination's record of `step`'s output, for kinds that publish; None for the others."""
    lookup = kind_info(step.kind).published
    return lookup(step, verify) if lookup else None


def recorded_outputs(steps: Iterable[Step]) -> dict[str, dict[str, Any]]:
    """key -> what a destination recorded of the step with that key (a manifest without files): the outputs a
    build may read the data of instead of making them, gathered from the records of the publishing steps."""
    out: dict[str, dict[str, Any]] = {}
    for step in steps:
        record = published_record(step)
        for rec in (record.records if record is not None else {}).values():
            if isinstance(rec, Mapping) and isinstance(rec.get("key"), str) and isinstance(rec.get("data", {}), dict):
                out[rec["key"]] = dict(rec)
    return out


def upstream_steps(step: Step) -> dict[str, Step]:
    """label -> `step` and every step it depends on."""
    out: dict[str, Step] = {}
    stack = [step]
    while stack:
        current = stack.pop()
        if current.label not in out:
            out[current.label] = current
            stack.extend(current.inputs.values())
    return out


def upstream_keys(step: Step) -> dict[str, str]:
    """label -> key of `step` and every step it depends on: what a published record keeps."""
    return dict(sorted((label, s.key) for label, s in upstream_steps(step).items()))


def since_published(step: Step, record: Published) -> list[Reason]:
    """What changed since the recorded publication: the first steps whose keys differ (a new source commit names
    the source step alone, not everything made from it), and steps the record has that the plan no longer does."""
    if record.key is None or not record.steps:
        return [Reason("unpublished", new=record.location)]
    graph: dict[str, Step] = {}
    stack = [step]
    while stack:
        current = stack.pop()
        if current.label not in graph:
            graph[current.label] = current
            stack.extend(current.inputs.values())
    changed = {label for label, s in graph.items() if record.steps.get(label) != s.key}
    reasons = [Reason("since-published", label, new="changed" if label in record.steps else "new")
               for label in sorted(changed) if not any(d.label in changed for d in graph[label].inputs.values())]
    reasons += [Reason("since-published", label, new="removed") for label in sorted(record.steps)
                if label not in graph]
    return reasons or [Reason("since-published", step.label, new="changed")]
