"""`quantforge schema`: the JSON Schema editors check targets files with, and the reference page made from it."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config_hardening import SEEDS, mutated_documents
from typer.testing import CliRunner

from quantforge.cli import app
from quantforge.errors import ConfigError
from quantforge.pipeline import load_targets
from quantforge.schema_export import REGENERATE, reference_markdown

EXAMPLES = [REPO / "targets.yaml", *sorted((REPO / "examples").glob("*.yaml"))]


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_schema_accepts_the_example_targets_files(validator, path):
    load_targets(path)  # quantforge accepts it too
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert errors == []


BROKEN = [
    ("models:\n  - {name: a, source: org/a, formats: {gguf: {typs: [Q4_K_M]}}}\n", "'typs' was unexpected"),
    ("models:\n  - {name: a, source: org/a, formats: {gguf: {types: [Q4_K_MM]}}}\n", "Q4_K_MM"),
    ("models:\n  - {source: org/a, formats: {gguf: {}}}\n", "'name' is a required property"),
    ("models:\n  - {name: a, source: org/a, formats: {gguf: {types: Q4_K_M}}}\n", "is not of type 'array'"),
    ("models:\n  - {name: a, source: org/a, formats: {gptq: {bits: 5}}}\n", "5"),
    ("defaults: {name: a}\nmodels:\n  - {name: a, source: org/a, formats: {gguf: {}}}\n", "'name' was unexpected"),
    ("models: []\n", "should be non-empty"),
]


@pytest.mark.parametrize(("text", "message"), BROKEN, ids=[m for _, m in BROKEN])
def test_the_schema_rejects_what_quantforge_rejects(validator, write_targets, text, message):
    with pytest.raises(ConfigError):
        load_targets(write_targets(text))
    errors = _messages(validator.iter_errors(yaml.safe_load(text)))
    assert any(message in e for e in errors), errors


def _messages(errors) -> list[str]:
    """Each error's message and those of the alternatives it tried (`gguf: X | null` fails as a whole)."""
    return [m for e in errors for m in [e.message, *_messages(e.context or [])]]


def test_type_names_in_any_case_are_accepted_as_quantforge_accepts_them(validator, write_targets):
    text = "models:\n  - {name: a, source: org/a, formats: {gguf: {types: [q4_k_m, Iq4_Xs, Q8_0]}}}\n"
    assert load_targets(write_targets(text)).models[0].formats.gguf.types == ["Q4_K_M", "IQ4_XS", "Q8_0"]
    assert list(validator.iter_errors(yaml.safe_load(text))) == []


def _accepted_by_both_if_loaded(validator, tmp_path_factory, document) -> None:
    """A document quantforge loads must pass the schema too (one it refuses may or may not)."""
    path = tmp_path_factory.mktemp("schema") / "targets.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_targets(path)
    except ConfigError:
        return
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == [], yaml.safe_dump(document)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(document=mutated_documents())
def test_every_file_quantforge_accepts_the_schema_accepts(validator, tmp_path_factory, document):
    """Editors must not flag a valid file: mutations of real files that still load pass the schema too."""
    _accepted_by_both_if_loaded(validator, tmp_path_factory, document)


def _leaves(node, path=()):
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    if isinstance(node, list):
        return [leaf for i, value in enumerate(node) for leaf in _leaves(value, (*path, i))]
    return [path]


@st.composite
def retyped_documents(draw: st.DrawFn):
    """A real file with some values written as another YAML type: "512" for 512, 1 for true, 0.5 for "0.5"..."""
    document = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(SEEDS))))
    for path in draw(st.lists(st.sampled_from(_leaves(document)), min_size=1, max_size=3)):
        *parents, last = path
        node = document
        for part in parents:
            node = node[part]
        value = node[last]
        node[last] = draw(st.sampled_from([str(value), str(value).lower(), 1, 0, True, False, 1.0, 0.5, 512, 512.0,
                                           "yes", "on", "1", None, [value], {"x": value}]))
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=retyped_documents())
def test_values_of_another_type_are_refused_by_both_or_by_neither(validator, tmp_path_factory, document):
    """The loader takes YAML's types as they are (strict), so the schema can say exactly what it accepts."""
    _accepted_by_both_if_loaded(validator, tmp_path_factory, document)


def test_the_reference_page_is_generated_from_the_schema():
    page = REPO / "docs" / "targets-reference.md"
    assert page.is_file() and page.read_text() == reference_markdown(), (
        f"docs/targets-reference.md is stale: run `{REGENERATE}` (with this checkout's quantforge) and commit it")


def test_the_reference_page_names_every_key_of_every_format():
    page = reference_markdown()
    for section in ["formats.gguf", "formats.gptq", "formats.awq", "publish", "evaluation", "calibration"]:
        assert f"\n## {section}\n" in page
    for key in ["types", "imatrix", "intermediate", "group_size", "desc_act", "damp", "zero_point", "max_kld",
                "max_file_size", "runner", "license_link", "allow_patterns"]:
        assert f"| `{key}` |" in page
    assert "yaml-language-server: $schema=./targets.schema.json" in page
