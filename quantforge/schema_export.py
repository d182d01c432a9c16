"""targets.yaml described for others: a JSON Schema for editors (`quantforge schema`) and the Markdown reference
page (`quantforge schema --markdown`, committed as docs/targets-reference.md). Both come from the pydantic models
the loader validates with, every offered format included, so neither can drift from the code.

    pipeline.FORMATS ─► config.loader.schema_for ─► TargetsFile ─► JSON Schema ─► Markdown
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ConfigDict, Field, create_model

from .config.loader import schema_for
from .pipeline import FORMATS

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "urn:quantforge:targets"
TITLE = "quantforge targets file"
REGENERATE = "quantforge schema --markdown > docs/targets-reference.md"


def targets_schema() -> dict[str, Any]:
    """The JSON Schema of a targets file: `defaults` (any model setting) and `models` (at least one)."""
    settings, target = schema_for(tuple((name, fmt.settings) for name, fmt in FORMATS.items()))
    file_model = create_model(
        "TargetsFile", __config__=ConfigDict(extra="forbid", title=TITLE),
        __doc__="A targets file: the models to build, and the settings they share.",
        defaults=(settings | None, Field(None, description="Merged into every model; a model's own keys win. Any "
                                         "key of a model entry but `name`, `source` and `base_model`.")),
        models=(list[target], Field(min_length=1, description="The source models to build, each with its formats.")),
    )
    schema = file_model.model_json_schema()
    head = {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_ID, "title": schema.pop("title"),
            "description": schema.pop("description")}
    return {**head, **schema}


def schema_json() -> str:
    return json.dumps(targets_schema(), indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------------- the reference page

_INTRO = f"""\
<!-- Generated from quantforge's schema: do not edit. Regenerate with `{REGENERATE}`. -->
# targets.yaml reference

A targets file names source models and the formats to make of each:

```yaml
# yaml-language-server: $schema=./targets.schema.json
defaults:        # merged into every model; a model's own keys win
  publish: {{to: hub, namespace: my-org}}
models:
  - name: Qwen2.5-7B-Instruct
    source: Qwen/Qwen2.5-7B-Instruct
    formats:
      gguf: {{types: [Q4_K_M, Q8_0], imatrix: true}}
```

Relative paths are relative to the targets file. Unknown keys are errors with a suggestion, and every error names
the file, line and key path, e.g.
`targets.yaml:12: models[1].formats.gguf.typs: unknown key 'typs'; did you mean 'types'?`. Nothing runs when the
file is invalid (`quantforge validate FILE` checks it). See `targets.yaml` (three 7B models) and
`examples/smollm2.yaml` (the demo).

**In an editor.** `quantforge schema > targets.schema.json` writes the file's JSON Schema; with the first line
above, editors that use the YAML language server (VS Code's YAML extension, Neovim, Helix, JetBrains IDEs)
complete keys and allowed values and flag mistakes while you type. The schema checks shapes and allowed values;
`quantforge validate` also checks what spans keys (repo names that collide, licences, group sizes).
"""

# The sections, in reading order: (schema definition, heading, what it is); a heading is its own anchor
_SECTIONS = [
    ("TargetsFile", "The file", None),
    ("ModelTarget", "A model", "An entry of `models`. `defaults` takes the same keys but `name`, `source` and "
                               "`base_model`, and its values are merged into every model."),
    ("PublishTarget", "publish", None),
    ("EvaluationSettings", "evaluation", None),
    ("CalibrationSettings", "calibration", None),
    ("Formats", "formats", "One entry per format to build; a format left out is not built, `{}` builds it with "
                           "its defaults."),
]


def reference_markdown() -> str:
    """docs/targets-reference.md: one table per block of the file (key, type, default, meaning)."""
    schema = targets_schema()
    defs = schema["$defs"]
    defs["TargetsFile"] = schema
    sections = list(_SECTIONS)
    formats = defs["Formats"]["properties"]
    for name in formats:
        ref = _ref_name(formats[name])
        sections.append((ref, f"formats.{name}", None))
        # a map of blocks (names of the user's own, each a block of keys) gets its own table after its format's
        blocks = [(_ref_name(prop["additionalProperties"]), f"formats.{name}.{key}.NAME", None)
                  for key, prop in defs[ref]["properties"].items()
                  if isinstance(prop.get("additionalProperties"), dict) and _ref_name(prop["additionalProperties"])]
        for block, heading, note in blocks:  # and a block inside such a block after it (variants.NAME.budget)
            sections += [(block, heading, note)] + [(_ref_name(prop), f"{heading}.{key}", None)
                                                    for key, prop in defs[block]["properties"].items()
                                                    if "properties" in defs.get(_ref_name(prop), {})]
    anchors = {ref: (heading, _anchor(heading)) for ref, heading, _ in sections}
    anchors["ModelTarget"] = ("models", _anchor("A model"))
    anchors["ModelSettings"] = ("model settings", _anchor("A model"))
    out = [_INTRO.rstrip("\n")]
    for ref, heading, note in sections:
        model = defs[ref]
        out += ["", f"## {heading}", "", note or model.get("description", "").strip(), ""]
        out += ["| key | type | default | |", "|---|---|---|---|"]
        required = set(model.get("required", ()))
        # what must be there first, then the rest in the order the code declares them
        for key, prop in sorted(model["properties"].items(), key=lambda item: item[0] not in required):
            default = "required" if key in required else _default(prop)
            # a block's row says what its own table says first
            about = prop.get("description") or defs.get(_ref_name(prop), {}).get("description", "")
            out.append(f"| `{key}` | {_type(prop, defs, anchors)} | {default} | {_cell(about)} |")
    return "\n".join(out) + "\n"


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, spaces to '-', other punctuation dropped."""
    return "".join(c for c in heading.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def _ref_name(prop: dict[str, Any]) -> str:
    """The definition a property refers to, through an optional (`X | None`) union; "" when none."""
    for option in [prop, *prop.get("anyOf", ())]:
        if "$ref" in option:
            return option["$ref"].rsplit("/", 1)[-1]
    return ""


def _type(prop: dict[str, Any] | bool, defs: dict[str, Any], anchors: dict[str, tuple[str, str]]) -> str:
    if not isinstance(prop, dict):  # `true`: anything
        return "any"
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        if name in anchors:
            label, anchor = anchors[name]
            return f"[{label}](#{anchor})"
        return _type(defs[name], defs, anchors)
    if "anyOf" in prop:
        options = [o for o in prop["anyOf"] if o.get("type") != "null"]
        if len(options) == 2 and "enum" in options[0] and "pattern" in options[1]:  # names in any case
            return _type(options[0], defs, anchors) + " (any case)"
        return " or ".join(_type(o, defs, anchors) for o in options)
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    kind = prop.get("type", "any")
    if kind == "array":
        text = f"list of {_type(prop.get('items', {}), defs, anchors)}"
    elif kind == "object":
        text = f"map of text to {_type(prop.get('additionalProperties', {}), defs, anchors)}"
    else:
        text = {"string": "text", "integer": "integer", "number": "number", "boolean": "true/false"}.get(kind, kind)
    return text + _bounds(prop)


def _bounds(prop: dict[str, Any]) -> str:
    low = [f"≥ {prop['minimum']}"] if "minimum" in prop else [f"> {prop['exclusiveMinimum']}"] \
        if "exclusiveMinimum" in prop else []
    high = [f"≤ {prop['maximum']}"] if "maximum" in prop else [f"< {prop['exclusiveMaximum']}"] \
        if "exclusiveMaximum" in prop else []
    if "minItems" in prop:
        low.append(f"at least {prop['minItems']}")
    if "minLength" in prop:
        low.append("not empty" if prop["minLength"] == 1 else f"at least {prop['minLength']} characters")
    parts = low + high
    return f", {' and '.join(parts)}" if parts else ""


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return ""
    value = prop["default"]
    if value is None:
        return "unset"
    if any("$ref" in option for option in [prop, *prop.get("anyOf", ())]):  # a block: its own table has them
        return ""
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
