from __future__ import annotations

import pytest

from quantforge.errors import ConfigError
from quantforge.pipeline import load_targets

VALID = """
defaults:
  publish: {to: "dir:./out", namespace: acme}
  formats:
    gguf: {types: [Q4_K_M, Q8_0]}
models:
  - name: a
    source: ./a
  - name: b
    source: org/b
    revision: v1.0
    formats:
      gguf: {types: [q6_k]}
    publish: {repo: "{model}-quants"}
"""


def test_defaults_merge_into_each_model(write_targets):
    targets = load_targets(write_targets(VALID))
    a, b = targets.models
    assert a.formats.gguf.types == ["Q4_K_M", "Q8_0"]
    assert b.formats.gguf.types == ["Q6_K"]  # model wins, type names are case-insensitive
    assert b.publish.namespace == "acme" and b.publish.repo_name("b", "gguf") == "b-quants"
    assert a.publish.repo_name("a", "gguf") == "a-GGUF"
    assert b.revision == "v1.0" and a.revision == "main"


# (yaml, expected line, key path, fragment of the message)
INVALID = [
    ("models:\n  - name: a\n    sorce: ./a\n    formats: {gguf: {}}\n", 3, "models[0].sorce", "did you mean 'source'"),
    ("models:\n  - name: a\n    source: ./a\n    formats:\n      gguf:\n        types: [Q4_K_X]\n", 6,
     "models[0].formats.gguf.types[0]", "Q4_K_M"),
    ("models:\n  - name: a\n    source: ./a\n    formats:\n      gguf: {typs: [Q8_0]}\n", 5,
     "models[0].formats.gguf.typs", "did you mean 'types'"),
    ("models:\n  - name: a\n    source: ./a\n", 2, "models[0]", "no formats"),
    ("models:\n  - source: ./a\n    formats: {gguf: {}}\n", 2, "models[0].name", "Field required"),
    ("defaults:\n  publish: {to: ftp://x}\nmodels:\n  - {name: a, source: ./a, formats: {gguf: {}}}\n", 2,
     "defaults.publish.to", "dir:PATH"),
    ("defaults:\n  formats: {gguf: {types: [Q9]}}\nmodels:\n  - {name: a, source: ./a}\n", 2,
     "defaults.formats.gguf.types[0]", "Input should be"),
    ("models:\n  - {name: a, source: ./a, formats: {gguf: {}}}\n  - {name: a, source: ./b, formats: {gguf: {}}}\n",
     3, "models[1].name", "duplicate model name"),
    ("models:\n  - {name: 'a b', source: ./a, formats: {gguf: {}}}\n", 2, "models[0].name", "letters, digits"),
    ("models:\n  - {name: a, source: 'not a repo', formats: {gguf: {}}}\n", 2, "models[0].source", "Hub repo id"),
    ("models:\n  - {name: a, source: ./a, formats: {gguf: {types: [Q8_0, q8_0]}}}\n", 2,
     "models[0].formats.gguf.types", "listed more than once"),
    ("modles: []\n", 1, "modles", "did you mean 'models'"),
    ("models:\n  - name: a\n    name: b\n", 3, "models[0].name", "duplicate key"),
    ("models: [\n", 2, "", "not valid YAML"),
    ("models:\n  - {name: a, source: org/a, revision: 1234, formats: {gguf: {}}}\n", 2, "models[0].revision",
     "put it in quotes"),
    ("models:\n  - {name: a, source: ./a, formats: {exl2: {bits: 4}}}\n", 2, "models[0].formats.exl2",
     "unknown key 'exl2'"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), INVALID, ids=[i[2] or i[3] for i in INVALID])
def test_invalid_configs_name_file_line_and_key(write_targets, text, line, key, fragment):
    path = write_targets(text)
    with pytest.raises(ConfigError) as info:
        load_targets(path)
    issues = info.value.issues
    match = [i for i in issues if i.key_path == key]
    assert match, f"no issue at {key!r}: {[str(i) for i in issues]}"
    assert match[0].line == line, str(match[0])
    assert match[0].file == str(path)
    assert fragment in match[0].message, str(match[0])
    assert str(match[0]).startswith(f"{path}:{line}:")


def test_every_problem_is_reported_not_just_the_first(write_targets):
    path = write_targets("models:\n  - {name: a, sorce: ./a, formats: {gguf: {}}}\n  - {name: b, source: ./b}\n")
    with pytest.raises(ConfigError) as info:
        load_targets(path)
    assert {i.key_path for i in info.value.issues} >= {"models[0].sorce", "models[1]"}


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_targets(tmp_path / "nope.yaml")


def test_repo_examples_are_valid():
    from conftest import REPO

    for path in [REPO / "targets.yaml", *sorted((REPO / "examples").glob("*.yaml"))]:
        load_targets(path)


@pytest.mark.parametrize(("fmt", "problem"), [
    ("gptq: {bits: 5}", "models[0].formats.gptq.bits"),
    ("gptq: {group_size: 8}", "formats.gptq.group_size: expected -1"),
    ("gptq: {grop_size: 64}", "did you mean 'group_size'?"),
    ("awq: {bits: 3}", "models[0].formats.awq.bits"),
    ("awq: {group_size: -1}", "AWQ needs groups"),
    ("gguf: {imatrix: maybe}", "formats.gguf.imatrix"),
])
def test_calibrated_formats_reject_bad_settings(write_targets, fmt, problem):
    path = write_targets(f"models:\n  - name: m\n    source: org/m\n    formats: {{{fmt}}}\n")
    with pytest.raises(ConfigError) as err:
        load_targets(path)
    assert problem in str(err.value)
    assert f"{path}:4:" in str(err.value)


def test_checkpoint_gates_take_no_type(write_targets):
    path = write_targets("models:\n  - name: m\n    source: org/m\n    formats: {gptq: {}}\n"
                         "    evaluation: {max_ppl_increase: {gptq/4bit: 0.1}}\n")
    with pytest.raises(ConfigError, match="gptq makes one checkpoint"):
        load_targets(path)


def test_calibration_defaults_and_overrides(write_targets):
    path = write_targets("defaults:\n  calibration: {samples: 16}\nmodels:\n  - name: m\n    source: org/m\n"
                         "    formats: {gptq: {seq_len: 128}, awq: {}}\n")
    model = load_targets(path).models[0]
    assert (model.calibration.samples, model.calibration.seq_len, model.calibration.dataset) == (16, 512, "builtin:mix")
    assert model.formats.gptq.seq_len == 128 and model.formats.gptq.samples is None
    assert (model.formats.gptq.bits, model.formats.gptq.group_size, model.formats.gptq.desc_act) == (4, 128, False)
    assert (model.formats.awq.zero_point, model.formats.awq.bits) == (True, 4)


def test_lowest_bit_iquants_need_an_importance_matrix(write_targets):
    path = write_targets("models:\n  - name: m\n    source: org/m\n    formats:\n"
                         "      gguf: {types: [Q4_K_M, iq2_xxs]}\n")
    with pytest.raises(ConfigError) as err:
        load_targets(path)
    assert str(err.value) == f"{path}:5: models[0].formats.gguf: IQ2_XXS needs an importance matrix: add imatrix: true"
    path.write_text(path.read_text().replace("iq2_xxs]", "iq2_xxs], imatrix: true"))
    assert load_targets(path).models[0].formats.gguf.types == ["Q4_K_M", "IQ2_XXS"]
