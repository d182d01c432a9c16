"""The targets loader against broken and hostile files: every input gives Targets or a ConfigError whose issues
name the file and a line, quickly and in bounded memory. The regressions come from a fuzzing run (2,261 files,
64 tracebacks); the property-based test at the end keeps fuzzing."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantforge.config import yaml_safe
from quantforge.config.schema import MAX_NAME
from quantforge.errors import ConfigError, ConfigIssue
from quantforge.pipeline import load_targets

MODEL = "models:\n  - name: m\n    source: org/m\n    formats: {gguf: {}}\n"


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_targets(path)
    for issue in info.value.issues:
        assert issue.file == str(path)
        assert issue.line is not None and issue.line >= 1, str(issue)
    return info.value.issues


def one_issue(path: Path) -> ConfigIssue:
    issues = issues_of(path)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


def timed_load(path: Path) -> tuple[float, int]:
    """CPU seconds (wall time on a shared machine varies with its load) and peak traced bytes of validating
    `path` (ConfigError expected)."""
    tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(ConfigError):
            load_targets(path)
        return time.process_time() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------ key paths and lines (item 1)

def test_capitalised_unknown_key_in_a_model_is_named(write_targets):
    issue = one_issue(write_targets(MODEL + "    Name: x\n"))  # was IndexError: every capitalised part dropped
    assert (issue.line, issue.key_path) == (5, "models[0].Name")
    assert issue.message == "unknown key 'Name'; did you mean 'name'?"


def test_unknown_key_in_defaults_names_itself_not_its_parent(write_targets):
    path = write_targets("defaults:\n  evaluation:\n    CTX: 512\n" + MODEL)
    # was: "defaults.evaluation: unknown key 'evaluation'; did you mean 'evaluation'?"
    assert str(one_issue(path)) == f"{path}:3: defaults.evaluation.CTX: unknown key 'CTX'; did you mean 'ctx'?"


@pytest.mark.parametrize(("block", "line", "key"), [
    ("formats: {gguf: {Types: [Q8_0]}}", 4, "models[0].formats.gguf.Types"),
    ("publish: {Max_File_Size: 1GB}", 4, "models[0].publish.Max_File_Size"),
    ("evaluation: {max_kld: {gguf: X}}", 4, "models[0].evaluation.max_kld.gguf"),
    ("publish: {max_file_size: [1]}", 4, "models[0].publish.max_file_size"),  # str | int: tags 'str', 'int'
    ("1: x", 4, "models[0].1"),  # a key YAML read as a number is a key, not a list index
    ("null: x", 4, "models[0].None"),
])
def test_key_paths_are_the_yaml_keys(write_targets, block, line, key):
    formats = "" if block.startswith("formats") else "    formats: {gguf: {}}\n"
    issue = one_issue(write_targets(f"models:\n  - name: m\n    source: org/m\n    {block}\n{formats}"))
    assert (issue.line, issue.key_path) == (line, key), str(issue)


def test_error_in_a_merged_key_points_at_its_anchor(write_targets):
    path = write_targets("x-base: &base\n  source: org/m\n  formats: {gguf: {types: [Q9]}}\n"
                         "models:\n  - {<<: *base, name: m}\n")
    issues = {i.key_path: i for i in issues_of(path)}
    assert issues["x-base"].line == 1
    assert issues["models[0].formats.gguf.types[0]"].line == 3  # where the merged value is written


# ------------------------------------------------------------------------------ reading the file (items 2, 3)

def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_bytes(b"models:\n  - name: caf\xe9\n")  # Latin-1: was UnicodeDecodeError
    issue = one_issue(path)
    assert issue.line == 2 and "not UTF-8" in issue.message


def test_utf16_with_bom_is_read(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_bytes(MODEL.encode("utf-16"))
    assert load_targets(path).models[0].name == "m"


def test_control_character_names_the_line(write_targets):
    issue = one_issue(write_targets("models:\n  - name: a\x07b\n"))
    assert issue.line == 2 and "U+0007" in issue.message


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: *a}\n", "models: &m\n  - {name: m, x: *m}\n",
                                  "a: &a\n  <<: *a\n"])
def test_self_referencing_alias_is_refused(write_targets, text):
    issue = one_issue(write_targets(text))  # was RecursionError
    assert issue.line == 1 + text.count("\n", 0, text.index("*")) and "cycle" in issue.message


@pytest.mark.parametrize("text", [
    "models: " + "[" * 1000 + "]" * 1000 + "\n",  # libyaml's own limit
    "models: " + "[" * 100 + "]" * 100 + "\n",
    "models: " + "{a: " * 100 + "}" * 100 + "\n",
    "models:\n" + "".join("  " * d + "- \n" for d in range(1, 300)),
])
def test_deep_nesting_is_refused(write_targets, text):
    issue = one_issue(write_targets(text))  # was RecursionError
    assert "nest" in issue.message


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"models: *a{levels - 1}", ""])


def merge_bomb(levels: int = 9) -> str:
    lines = ["m0: &m0 {a: 1, b: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [{','.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, levels)]
    return "\n".join([*lines, ""])


@pytest.mark.parametrize("text", [
    billion_laughs(),  # 9^9 values from ~450 bytes: validate went past 7.5 GB
    merge_bomb(),  # the same through merge keys
    "defaults: &d {allow_patterns: [" + ",".join(["x"] * 500) + "]}\nmodels: [" + ",".join(["*d"] * 200) + "]\n",
])
def test_alias_bomb_is_refused_fast_and_small(write_targets, text):
    path = write_targets(text)
    assert len(text.encode()) < 3000
    seconds, peak = timed_load(path)
    assert seconds < 1.0 and peak < 50e6, (seconds, peak)
    issue = one_issue(path)
    assert "once aliases are expanded" in issue.message and issue.line > 1


def test_deep_nesting_through_aliases_is_refused(write_targets):
    text = "x: &y0 [[[[[[[[[[1]]]]]]]]]]\n" + "".join(f"y{i}: &y{i} [*y{i - 1}]\n" for i in range(1, 60))
    assert "levels deep once aliases are expanded" in one_issue(write_targets(text)).message


@pytest.mark.parametrize("text", [billion_laughs(), "a: &a [*a]\n", "models: " + "[" * 500 + "]" * 500])
def test_pure_python_parser_is_guarded_too(text):
    with pytest.raises(ConfigError) as info:
        yaml_safe.load_yaml(text, "t.yaml", libyaml=False)
    assert info.value.issues[0].line is not None


def test_large_defaults_times_many_models_is_refused(write_targets):
    text = ("defaults:\n  allow_patterns: [" + ",".join(["x"] * 2000) + "]\nmodels:\n"
            + "".join(f"  - {{name: m{i}, source: org/m, formats: {{gguf: {{}}}}}}\n" for i in range(60)))
    path = write_targets(text)
    seconds, _ = timed_load(path)
    assert seconds < 1.0
    assert "keep large settings out of defaults" in one_issue(path).message


def test_oversized_file_is_refused_unread(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_bytes(b"#" * (yaml_safe.MAX_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_targets(path)


@pytest.mark.parametrize(("value", "line"), [("2024-02-30", 2), ("9" * 5000, 2)])
def test_scalars_yaml_cannot_build_are_config_errors(write_targets, value, line):
    issue = one_issue(write_targets(f"models:\n  - {{name: m, source: org/m, revision: {value}}}\n"))
    assert issue.line == line and "cannot read" in issue.message  # was ValueError


def test_thousands_of_errors_are_capped(write_targets):
    path = write_targets("models:\n" + "".join(f"  - {{name: 'bad {i}', source: org/m, formats: {{gguf: {{}}}}}}\n"
                                              for i in range(2000)))
    issues = issues_of(path)
    assert len(issues) == 101 and "more problems" in issues[-1].message


# --------------------------------------------------------------------------- accepted but wrong (items 2, 4)

@pytest.mark.parametrize("size", ["1e400GB", "infGB", "nanGB", "-1e400GB", [1], True])
def test_unparseable_sizes_are_config_errors(write_targets, size):
    path = write_targets(MODEL + f"    publish: {{max_file_size: {json.dumps(size)}}}\n")
    issue = one_issue(path)  # '1e400GB' was OverflowError
    assert issue.key_path == "models[0].publish.max_file_size" and "48GB" in issue.message


@pytest.mark.parametrize(("block", "key"), [
    ('name: "m\\n"', "models[0].name"),
    ('source: "org/m\\n"', "models[0].source"),
    ('revision: "main\\n"', "models[0].revision"),
    ('publish: {namespace: "acme\\n"}', "models[0].publish.namespace"),
    ('publish: {repo: "{model}\\n"}', "models[0].publish.repo"),
    ('publish: {to: "dir:out\\0x"}', "models[0].publish.to"),
    ('publish: {to: "dir: "}', "models[0].publish.to"),
    ('revision: ""', "models[0].revision"),
    ('revision: "a b"', "models[0].revision"),
    ('source: "./a\\0b"', "models[0].source"),
    ('publish: {namespace: ""}', "models[0].publish.namespace"),
    ('publish: {repo: ""}', "models[0].publish.repo"),
    ('publish: {repo: "{model:x>999999999}"}', "models[0].publish.repo"),  # would build a 1 GB string
    ('publish: {repo: "{0}"}', "models[0].publish.repo"),
    ("allow_patterns: ['']", "models[0].allow_patterns[0]"),
    ('evaluation: {dataset: ""}', "models[0].evaluation.dataset"),
    ('evaluation: {dataset: "file:,"}', "models[0].evaluation.dataset"),
    ('evaluation: {dataset: "file:a\\0b"}', "models[0].evaluation.dataset"),
    ("evaluation: {max_ppl_increase: {gguf: .nan}}", "models[0].evaluation.max_ppl_increase"),
    ("evaluation: {max_kld: {gguf: .inf}}", "models[0].evaluation.max_kld"),
    ("evaluation: {max_kld: {gguf/Q8_0: -.inf}}", "models[0].evaluation.max_kld"),
    ("revision: yes", "models[0].revision"),
])
def test_values_that_were_accepted_but_wrong(write_targets, block, key):
    issue = one_issue(write_targets(MODEL + "    " + block + "\n"))
    assert (issue.line, issue.key_path) == (5, key), str(issue)


def test_model_names_are_capped_so_file_names_fit():
    from quantforge.formats.gguf import artifact_name
    from quantforge.gguf_types import GGUF_TYPES

    file = artifact_name("n" * MAX_NAME, max(GGUF_TYPES, key=len))
    shard = file.removesuffix(".gguf") + "-00001-of-00009.gguf"  # the longest: a split shard of that file
    assert len(shard.encode()) < 255


@pytest.mark.parametrize(("length", "ok"), [(MAX_NAME, True), (MAX_NAME + 1, False), (300, False)])
def test_long_model_names(write_targets, length, ok):
    path = write_targets(f"models:\n  - {{name: {'n' * length}, source: org/m, formats: {{gguf: {{}}}},"
                         " publish: {repo: '{model}'}}\n")
    if ok:
        assert load_targets(path).models[0].name == "n" * length
    else:
        issue = one_issue(path)  # the build crashed: File name too long
        assert issue.key_path == "models[0].name" and f"at most {MAX_NAME}" in issue.message


def test_rendered_repo_names_are_capped(write_targets):
    path = write_targets(f"models:\n  - {{name: {'n' * 91}, source: org/m, formats: {{gguf: {{}}}}}}\n")
    assert load_targets(path).models[0].publish.repo_name("n" * 91, "gguf") == "n" * 91 + "-GGUF"  # 96
    path = write_targets(f"models:\n  - {{name: {'n' * 92}, source: org/m, formats: {{gguf: {{}}}}}}\n")
    issue = one_issue(path)
    assert issue.key_path == "models[0].publish.repo" and "97 characters" in issue.message


# ----------------------------------------------------------------------------- repo collisions (item 5)

def test_two_models_publishing_to_one_repo(write_targets):
    path = write_targets("""
        defaults:
          publish: {to: "dir:./out", namespace: acme}
          formats: {gguf: {}}
        models:
          - name: x
            source: org/x
          - name: y
            source: org/y
            publish: {repo: x-GGUF}
        """)
    assert str(one_issue(path)) == (f"{path}:9: models[1].publish.repo: renders to acme/x-GGUF, which models[0] "
                                    "(line 5) also publishes to")


def test_two_formats_of_one_model_publishing_to_one_repo(write_targets):
    path = write_targets("defaults:\n  publish: {repo: '{model}-quants'}\n"
                         "models:\n  - {name: x, source: org/x, formats: {gptq: {}, awq: {}}}\n")
    issue = one_issue(path)
    assert (issue.line, issue.key_path) == (2, "models[0].publish.repo")
    assert issue.message == "renders to local/x-quants for both gptq and awq; put {format} or {FORMAT} in it"


@pytest.mark.parametrize("to", ["hub", "'dir:out'"])
def test_repo_ids_collide_regardless_of_case(write_targets, to):
    path = write_targets(f"defaults:\n  publish: {{to: {to}}}\n  formats: {{gguf: {{}}}}\n"
                         "models:\n  - {name: x, source: org/x}\n  - {name: X, source: org/y}\n")
    assert one_issue(path).message.endswith("also publishes to as local/x-GGUF (the same repo: case is ignored)")


@pytest.mark.parametrize(("name", "repo"), [("x--y", "{model}"), ("x", "{model}-"), ("x", "{model}..v2"),
                                            ("x", "{model}.git")])
def test_repo_names_the_hub_refuses(write_targets, name, repo):
    path = write_targets(f"models:\n  - {{name: {name}, source: org/x, formats: {{gguf: {{}}}}, "
                         f"publish: {{to: hub, repo: '{repo}'}}}}\n")
    assert "which the Hub refuses" in one_issue(path).message
    path.write_text(path.read_text().replace("to: hub", "to: 'dir:out'"))  # a folder takes them
    assert load_targets(path).models[0].name == name


@pytest.mark.parametrize(("first", "second", "collide"), [
    ("dir:out", "dir:./out/../out", True),  # relative to the targets file, normalized
    ("dir:out", "dir:other", False),
    ("hub", "dir:out", False),
])
def test_destinations_separate_repos(write_targets, first, second, collide):
    path = write_targets("models:\n"
                         f"  - {{name: x, source: org/x, formats: {{gguf: {{}}}}, publish: {{to: '{first}'}}}}\n"
                         f"  - {{name: y, source: org/y, formats: {{gguf: {{}}}}, publish: {{to: '{second}', "
                         "repo: x-GGUF}}\n")
    if collide:
        assert "also publishes to" in one_issue(path).message
    else:
        assert len(load_targets(path).models) == 2


# ------------------------------------------------------------------------------------- property-based (item 6)

# QF_FUZZ_EXAMPLES=20000 for a long run; the default keeps this file well under a minute on two cores
FUZZ_EXAMPLES = int(os.environ.get("QF_FUZZ_EXAMPLES", "500"))
SLOWEST = [0.0]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    yield tmp_path_factory.mktemp("fuzz")
    print(f"\nslowest validation: {SLOWEST[0]:.3f}s")


@st.composite
def publish_plans(draw: st.DrawFn) -> str:
    """Valid models whose names, repo templates and destinations often meet."""
    models = []
    for i in range(draw(st.integers(1, 4))):
        formats = draw(st.lists(st.sampled_from(["gguf", "gptq", "awq"]), min_size=1, max_size=3, unique=True))
        models.append({
            "name": draw(st.sampled_from(["a", "A", "b", "a-GGUF", f"m{i}"])), "source": "org/m",
            "formats": {f: {} for f in formats},
            "publish": {"to": draw(st.sampled_from(["hub", "dir:out", "dir:./out", "dir:../x/out", "dir:~/out"])),
                        "repo": draw(st.sampled_from(["{model}-{FORMAT}", "{model}", "a-GGUF", "{model}-{format}"])),
                        "namespace": draw(st.sampled_from(["acme", "ACME", "other"]))},
        })
    return yaml.safe_dump({"models": models})


@settings(max_examples=FUZZ_EXAMPLES // 3 or 1, deadline=None)
@given(text=publish_plans())
def test_no_two_valid_artifacts_share_a_repo(fuzz_dir, text):
    path = fuzz_dir / "plans.yaml"
    path.write_text(text)
    try:
        targets = load_targets(path)
    except ConfigError as exc:
        assert all(issue.line for issue in exc.issues)
        return
    repos = [(m.publish.to if m.publish.to == "hub" else str(targets.resolve_path(m.publish.to[4:])),
              f"{m.publish.namespace}/{m.publish.repo_name(m.name, fmt)}".lower())
             for m in targets.models for fmt in m.formats.enabled()]
    assert len(repos) == len(set(repos))


SMOLLM2 = """
defaults:
  publish: {to: "dir:../demo/out", namespace: demo, repo: "{model}-{FORMAT}"}
  evaluation:
    dataset: builtin
    ctx: 512
    chunks: 8
    max_ppl_increase: {gguf/Q5_K_M: 0.15, gguf/Q4_0: 0.40, gptq: 0.25}
  calibration: {dataset: builtin, samples: 32, seq_len: 512}
models:
  - name: SmolLM2-135M-Instruct
    source: ../demo/SmolLM2-135M-Instruct
    formats:
      gguf: {types: [Q8_0, Q4_K_M, F16], imatrix: true}
      gptq: {bits: 4, group_size: 64, samples: 8, seq_len: 256}
"""
PRODUCTION = """
defaults:
  publish: {to: hub, namespace: my-org, private: false, repo: "{model}-{FORMAT}", max_file_size: 48GB}
  evaluation:
    max_ppl_increase: {gguf/Q8_0: 0.01, gptq: 0.08, awq: 0.08}
    max_kld: {gguf: 0.1}
  formats:
    gguf: {types: [Q4_K_M, Q8_0], imatrix: true}
    gptq: {bits: 4, group_size: 128, desc_act: false}
    awq: {bits: 4, group_size: 128}
models:
  - {name: dolphin-2.8-mistral-7b-v02, source: cognitivecomputations/dolphin-2.8-mistral-7b-v02, revision: main}
  - name: Qwen2.5-7B-Instruct
    source: Qwen/Qwen2.5-7B-Instruct
    allow_patterns: ["*.safetensors", "*.json"]
    formats: {gguf: {types: [Q4_K_M, Q6_K]}}
"""
SEEDS = [yaml.safe_load(SMOLLM2), yaml.safe_load(PRODUCTION)]
for seed in SEEDS:  # the seeds themselves are valid, so mutations start from real structure
    assert isinstance(seed, dict)

KEYS = ["name", "source", "revision", "formats", "gguf", "gptq", "awq", "types", "publish", "to", "repo",
        "namespace", "evaluation", "max_kld", "max_ppl_increase", "calibration", "defaults", "models", "ctx",
        "samples", "imatrix", "group_size", "bits", "dataset", "allow_patterns", "max_file_size", "<<",
        "license", "license_name", "license_link", "base_model"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.binary(max_size=12),
    st.sampled_from(["", "\n", "\x00", "hub", "dir:", "dir:x", "1e400GB", "48GB", "Q4_K_M", "iq1_s", "gguf/Q8_0",
                     "{model}", "{model}{model}", "{x}", "a" * 200, "org/m", "./m", "file:,", "hf:a::b:c", "main",
                     "other", "mit", "LICENSE", "https://x"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars), inner, max_size=4)),
    max_leaves=12)


def _containers(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if isinstance(node, dict | list) else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _containers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _containers(value, (*path, i))
    return out


def _at(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    data = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(SEEDS))))  # a deep copy
    for _ in range(draw(st.integers(1, 4))):
        target = _at(data, draw(st.sampled_from(_containers(data))))
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        op = draw(st.sampled_from(["delete", "replace", "insert", "recase", "rename", "nest"]))
        if not keys or op == "insert":
            key = draw(st.one_of(st.sampled_from(KEYS), scalars)) if isinstance(target, dict) else len(target)
            if isinstance(target, dict):
                target[key] = draw(values)
            else:
                target.append(draw(values))
            continue
        key = draw(st.sampled_from(keys))
        if op == "delete":
            del target[key]
        elif op == "replace":
            target[key] = draw(values)
        elif op == "nest":
            target[key] = [target[key]] if draw(st.booleans()) else {draw(st.sampled_from(KEYS)): target[key]}
        elif isinstance(target, dict) and isinstance(key, str):
            new = key.upper() if op == "recase" else draw(st.text(min_size=1, max_size=12))
            target[new] = target.pop(key)
    return data


@st.composite
def mutated_texts(draw: st.DrawFn) -> bytes:
    """A mutated document, dumped in block or flow style, then mutated as text: lines duplicated, dropped or
    swapped (duplicate keys, broken indentation), YAML syntax or random characters or bytes spliced in."""
    text = yaml.safe_dump(draw(mutated_documents()), default_flow_style=draw(st.sampled_from([False, None, True])),
                          sort_keys=False, allow_unicode=draw(st.booleans()))
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["dup", "drop", "swap", "splice", "anchor", "indent"]))
        if not lines:
            break
        if op == "dup":
            lines.insert(i, lines[i])
        elif op == "drop":
            del lines[i]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "splice":
            bit = draw(st.one_of(st.text(max_size=6), st.sampled_from(["[", "{", "&a ", "*a", "<<: ", ": ", "- ",
                                                                        "!!binary ", "!!python/object ", "? ", "\t",
                                                                        "'", '"', "%YAML 1.1\n---\n", "---\n",
                                                                        " 2024-02-30", " 1e400GB", " .nan", " 0x",
                                                                        " " + "9" * 5000])))
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + bit + lines[i][pos:]
        elif op == "anchor":
            lines.insert(i, draw(st.sampled_from(["x: &a [*a]\n", "y: &b {<<: *b}\n", "z: *nowhere\n"])))
        else:
            lines[i] = "  " * draw(st.integers(0, 30)) + lines[i]
    raw = "".join(lines).encode(draw(st.sampled_from(["utf-8", "utf-16", "utf-8-sig"])))
    if draw(st.integers(0, 9)) == 9:  # a corrupted byte (0 is what hypothesis draws most)
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        raw = raw[:pos] + bytes([draw(st.integers(0, 255))]) + raw[pos + 1:]
    return raw


YAML_BITS = [*"ab: -[]{},&*!|>'\"#?\n\n\n  \t%@`\\0123456789.<~", "models:", "defaults:", "name:", "<<: "]
yamlish = st.lists(st.sampled_from(YAML_BITS), max_size=120).map(lambda bits: "".join(bits).encode())
deep = st.integers(40, 1200).map(lambda n: ("models: " + "[" * n + "]" * n).encode())
inputs = st.one_of(mutated_texts(), mutated_texts(), yamlish, st.binary(max_size=300), deep)

@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.data_too_large])
@given(raw=inputs)
def test_any_input_gives_targets_or_a_located_config_error(fuzz_dir, raw):
    path = fuzz_dir / "targets.yaml"
    path.write_bytes(raw)
    start = time.process_time()  # CPU seconds: wall time on a shared machine varies with its load
    try:
        load_targets(path)
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.file == str(path), str(issue)
            assert issue.line is not None and 1 <= issue.line <= len(raw) + 1, str(issue)
            assert issue.message
    seconds = time.process_time() - start
    SLOWEST[0] = max(SLOWEST[0], seconds)
    assert seconds < 1.0, f"{seconds:.2f}s"


# --------------------------------------------------------------------- values that mean nothing (issue 20, item 5)

@pytest.mark.parametrize(("fmt", "size", "ok"), [
    ("gptq", 18446744073709551617, False), ("gptq", 8, False), ("gptq", 48, False), ("gptq", 100, False),
    ("gptq", 2048, False), ("gptq", 0, False), ("gptq", -2, False), ("awq", -1, False), ("awq", 96, False),
    ("gptq", -1, True), ("gptq", 16, True), ("gptq", 32, True), ("gptq", 64, True), ("gptq", 128, True),
    ("awq", 256, True), ("awq", 512, True), ("gptq", 1024, True),
])
def test_group_sizes_are_those_a_kernel_loads(write_targets, fmt, size, ok):
    path = write_targets(f"models:\n  - name: m\n    source: org/m\n    formats: {{{fmt}: {{group_size: {size}}}}}\n")
    if ok:
        assert load_targets(path).models[0].formats.settings(fmt).group_size == size
        return
    issue = one_issue(path)
    assert (issue.line, issue.key_path) == (4, f"models[0].formats.{fmt}.group_size"), str(issue)
    assert "AWQ needs groups" in issue.message if size == -1 else "1024" in issue.message


def test_a_group_size_above_the_models_hidden_size_is_refused_at_plan(write_targets, tmp_path):
    from tiny_models import fake_checkpoint

    from quantforge.core.step import PlanContext
    from quantforge.errors import BadInputError
    from quantforge.pipeline import build_plan
    from quantforge.store import WorkDir

    ckpt = fake_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 64, "torch_dtype": "float16"}))
    context = PlanContext(work=WorkDir(tmp_path / "work"))
    fits = write_targets("models:\n  - {name: m, source: ./ckpt, formats: {gptq: {group_size: 64}}}\n")
    assert build_plan(load_targets(fits), context).steps
    too_big = write_targets("models:\n  - {name: m, source: ./ckpt, formats: {gptq: {group_size: 128}}}\n")
    with pytest.raises(BadInputError, match=r"m: formats\.gptq\.group_size 128 is larger than the model's hidden "
                                            r"size 64 \(config\.json\)"):
        build_plan(load_targets(too_big), context)


@pytest.mark.parametrize(("gate", "ok"), [
    ("max_ppl_increase: {gguf: 1.0e+300}", False), ("max_ppl_increase: {gguf: 10.5}", False),
    ("max_ppl_increase: {gguf: 1e300}", False),  # YAML 1.1 reads 1e300 as text: we read it as the number it is
    ("max_kld: {gguf/Q8_0: 11}", False), ("max_ppl_increase: {gptq: 1.0e+19}", False),
    ("max_ppl_increase: {gguf: 10}", True), ("max_kld: {gguf: 10}", True), ("max_ppl_increase: {gguf: 0}", True),
])
def test_gates_stay_within_what_a_real_artifact_can_mean(write_targets, gate, ok):
    path = write_targets(f"{MODEL}    evaluation: {{{gate}}}\n")
    if ok:
        load_targets(path)
        return
    issue = one_issue(path)
    assert issue.line == 5 and issue.key_path.startswith("models[0].evaluation.max_"), str(issue)
    assert "is more than 10" in issue.message and "--no-gate" in issue.message


def test_a_number_in_scientific_notation_is_a_number(write_targets):
    path = write_targets(f"{MODEL}    evaluation: {{max_kld: {{gguf: 1e-3, gguf/Q8_0: 5E-4}}}}\n")
    assert load_targets(path).models[0].evaluation.max_kld == {"gguf": 0.001, "gguf/Q8_0": 0.0005}


@pytest.mark.parametrize(("option", "value"), [("--max-ppl-increase", "1e300"), ("--max-ppl-increase", "nan"),
                                                ("--max-kld", "11"), ("--max-kld", "-1")])
def test_eval_gate_options_have_the_same_bounds(tmp_path, option, value):
    import subprocess
    import sys

    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "eval", str(tmp_path / "a.gguf"), "--source",
                           str(tmp_path), option, value, "--work-dir", str(tmp_path / "w")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {option}: "), proc.stderr
    assert "Traceback" not in proc.stderr


# (YAML text, key path, the character named): written as YAML escapes, and the bidi override also raw
INVISIBLE = [
    ('publish: {to: "dir:out/\\u202egguf.exe"}', "models[0].publish.to", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("publish: {to: 'dir:out/\u202egguf.exe'}", "models[0].publish.to", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ('source: "./ck\\u200bpt"', "models[0].source", "U+200B ZERO WIDTH SPACE"),
    ('source: "org/m\\u2066"', "models[0].source", "U+2066 LEFT-TO-RIGHT ISOLATE"),
    ('name: "m\\u200d"', "models[0].name", "U+200D ZERO WIDTH JOINER"),
    ('revision: "main\\u200f"', "models[0].revision", "U+200F RIGHT-TO-LEFT MARK"),
    ('evaluation: {dataset: "file:a\\u202a.txt"}', "models[0].evaluation.dataset",
     "U+202A LEFT-TO-RIGHT EMBEDDING"),
    ('allow_patterns: ["*\\ufeff.json"]', "models[0].allow_patterns[0]", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ('runner: "gpu\\u00a0large"', "models[0].runner", "U+00A0 NO-BREAK SPACE"),
    ('publish: {namespace: "acme\\u2028"}', "models[0].publish.namespace", "U+2028 LINE SEPARATOR"),
    ('publish: {repo: "{model}\\u2060-GGUF"}', "models[0].publish.repo", "U+2060 WORD JOINER"),
    ('base_model: "org/m\\u202d"', "models[0].base_model", "U+202D LEFT-TO-RIGHT OVERRIDE"),
    ('license: other\n    license_name: "x\\u00ad"\n    license_link: LICENSE', "models[0].license_name",
     "U+00AD SOFT HYPHEN"),
    ('source: "./a\\x85b"', "models[0].source", "U+0085 a control character"),
    ('source: "./a\\ue000b"', "models[0].source", "U+E000 (no name)"),
]


@pytest.mark.parametrize(("block", "key", "named"), INVISIBLE)
def test_invisible_characters_in_paths_and_names_are_refused_by_name(write_targets, block, key, named):
    fields = [line for line in ("name: m", "source: org/m") if not block.startswith(line.split(":")[0])]
    text = "models:\n  - formats: {gguf: {}}\n" + "".join(f"    {line}\n" for line in [*fields, block])
    issues = issues_of(write_targets(text))
    issue = next(i for i in issues if i.key_path == key)
    assert f"contains {named} (character " in issue.message, str(issue)
    assert issue.line is not None


@pytest.mark.parametrize(("remove", "missing"), [
    ("config.json", "no config.json"), ("model.safetensors", "no weight files (*.safetensors, *.bin)"),
    ("tokenizer.json", "no tokenizer (tokenizer.json, tokenizer.model, vocab.json, *.tiktoken)"),
])
def test_a_local_source_that_is_not_a_checkpoint_is_refused_at_validate_and_plan(tmp_path, remove, missing):
    import subprocess
    import sys

    from tiny_models import fake_checkpoint

    from quantforge.core.step import PlanContext
    from quantforge.errors import SourceError
    from quantforge.pipeline import build_plan
    from quantforge.store import WorkDir

    (fake_checkpoint(tmp_path / "ckpt") / remove).unlink()
    path = tmp_path / "targets.yaml"
    path.write_text("models:\n  - {name: m, source: ./ckpt, formats: {gguf: {}}}\n")
    proc = subprocess.run([sys.executable, "-m", "quantforge.cli", "validate", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == f"error: {path}: models[0].source: ./ckpt: has {missing}: not a Hugging Face checkpoint\n"
    with pytest.raises(SourceError) as info:
        build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "work")))
    assert str(info.value) == f"m: source folder {tmp_path / 'ckpt'} has {missing}: not a Hugging Face checkpoint"


def test_the_size_refusal_says_what_limit_and_why(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_bytes(b"#" * (yaml_safe.MAX_BYTES + 1))
    with pytest.raises(ConfigError) as info:  # refused unread: no line to name
        load_targets(path)
    [issue] = info.value.issues
    assert issue.message == ("larger than 256 KB, the limit for a targets file (a real one is a few KB): the limit "
                             "keeps a file given by mistake, such as a model or a log, from being read whole and "
                             "parsed")
