"""Publishing like the best quantizers: the Hub's model tree and a licence for every source, provenance inside each
GGUF, the importance matrix beside the files, Ollama's sampling params, what users copy from the cards, and no
local path in anything published."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from quantforge import __version__
from quantforge.card import chat_example, public_text_name
from quantforge.core.formats import ReleaseInfo
from quantforge.core.step import PlanContext, StepOutput
from quantforge.errors import ConfigError, PublishError
from quantforge.formats.gguf import render_gguf_card
from quantforge.formats.gguf_release import ollama_params, sampling_defaults
from quantforge.pipeline import build_plan, load_targets
from quantforge.publish import _refuse_local_paths, public_data
from quantforge.store import WorkDir

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def quantforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True, env=env)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def local_source(tmp_path: Path, generation: dict | None = None) -> StepOutput:
    src = tmp_path / "users" / "alice" / "checkpoints" / "tiny"
    src.mkdir(parents=True)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    if generation is not None:
        (src / "generation_config.json").write_text(json.dumps(generation))
    return StepOutput(src, {"params": {"source": str(src), "digest": "d" * 64}, "data": {"path": str(src)}})


def artifacts(tmp_path: Path, figures: dict[str, tuple[int, float]]) -> dict[str, tuple[StepOutput, StepOutput]]:
    """type -> (size, PPL) as quantize and gate outputs; the source's PPL is 10, every error 0.5."""
    out = {}
    for qtype, (size, ppl) in figures.items():
        quant = StepOutput(tmp_path, {"tools": {"libllama": "0.3.36"}, "data": {
            "file": f"tiny-{qtype}.gguf", "size": size, "bits_per_weight": size * 8 / 1e9, "architecture": "llama",
            "converter": "llama-cpp-python==0.3.36", "fallbacks": []}})
        gate = StepOutput(tmp_path, {"data": {"ppl": ppl, "ppl_err": 0.5, "source_ppl": 10.0, "delta_ppl": ppl / 10 - 1,
                                              "kld_mean": 0.01, "top1": 0.9, "tokens_scored": 8160}})
        out[qtype] = (quant, gate)
    return out


FIGURES = {"Q8_0": (8_000_000_000, 10.04), "Q6_K": (6_500_000_000, 10.09), "Q5_K_M": (5_500_000_000, 10.05),
           "Q4_K_M": (4_500_000_000, 10.40)}


def test_gguf_card_of_a_local_source_declares_its_model_tree_and_what_users_copy(tmp_path):
    source = local_source(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                     "repetition_penalty": 1.05, "bos_token_id": 1})
    tokens = StepOutput(tmp_path, {"params": {"dataset": f"file:{tmp_path}/texts/eval.txt", "ctx": 512, "chunks": 8}})
    release = ReleaseInfo(base_model=BASE, license="apache-2.0", siblings=(("gptq", "acme/tiny-GPTQ"),))
    text = render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                            artifacts=artifacts(tmp_path, FIGURES), tokens=tokens, release=release)

    # the model tree, as the Hub reads it
    card = ModelCard(text)
    assert isinstance(card.data, ModelCardData)
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0" and card.data.library_name == "gguf" and card.data.quantized_by == "acme"
    meta = front_matter(text)
    assert {"base_model", "base_model_relation", "license"} <= set(meta)
    assert ModelCardData(**meta).to_dict() == card.data.to_dict()

    # the file table, smallest first, the recommended default marked
    rows = [line for line in text.splitlines() if line.startswith("| ") and ".gguf](./" in line]
    assert [r.split("[tiny-")[1].split(".gguf")[0] for r in rows] == ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    assert rows[0].startswith("| ⭐ | [tiny-Q4_K_M.gguf]") and all(r.startswith("|  | ") for r in rows[1:])
    # Q6_K measured worse than the smaller Q5_K_M, by less than either figure's error: said to be noise
    assert "Q6_K measured a higher perplexity than the smaller Q5_K_M (10.090 ± 0.500 vs 10.050 ± 0.500)" in text
    assert text.count("**Within noise.**") == 1

    assert 'hf download acme/tiny-GGUF --include "*-Q4_K_M.gguf" --local-dir .' in text
    assert "lms get https://huggingface.co/acme/tiny-GGUF@Q4_K_M" in text
    assert "ollama run hf.co/acme/tiny-GGUF:Q4_K_M" in text
    assert "published it as GPTQ ([acme/tiny-GPTQ](https://huggingface.co/acme/tiny-GPTQ))" in text
    assert f"GGUF quantizations of [{BASE}](https://huggingface.co/{BASE})" in text
    assert f"local checkpoint `tiny` (content digest `dddddddddddddddd`), declared to be [{BASE}]" in text
    assert "llama-cpp-python 0.3.36: quantized by its libllama, converted by `convert_hf_to_gguf.py` from the " \
           "same release's source (llama-cpp-python 0.3.36)" in text
    assert "`temperature` 0.6, `top_p` 0.95, `top_k` 20, `repetition_penalty` 1.05" in text
    assert "`repeat_penalty` 1.05" in text and "[`params`](./params)" in text
    assert "`file:eval.txt`, 8 windows" in text
    assert str(tmp_path) not in text and "alice" not in text


def test_split_files_download_into_a_folder_and_other_licences_carry_name_and_link(tmp_path):
    source = local_source(tmp_path)
    shards = [f"tiny-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    release = ReleaseInfo(base_model=BASE, license="other", license_name="tiny-license",
                          license_link="https://example.com/LICENSE")
    text = render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                            artifacts=artifacts(tmp_path, FIGURES), tokens=None, release=release,
                            shards={"Q8_0": shards})
    assert 'hf download acme/tiny-GGUF --include "*-Q4_K_M.gguf" --local-dir .' in text
    assert 'hf download acme/tiny-GGUF --include "*-Q8_0-*-of-*.gguf" --local-dir tiny-Q8_0' in text
    card = ModelCard(text)
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "tiny-license", "https://example.com/LICENSE")
    assert "## Sampling defaults" not in text  # the source recommends none


def test_a_declared_licence_wins_over_the_hub_source_card_and_the_hub_source_is_the_base_model(tmp_path):
    src = tmp_path / "snapshot"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: mit\n---\n# Tiny\n")
    source = StepOutput(src, {"params": {"source": "org/tiny", "files": {"model.safetensors": "e" * 64}},
                              "data": {"path": str(src), "commit": "a" * 40}})
    figures = {"Q8_0": FIGURES["Q8_0"]}
    plain = ModelCard(render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                                       artifacts=artifacts(tmp_path, figures), tokens=None))
    assert (plain.data.base_model, plain.data.license) == ("org/tiny", "mit")
    declared = ModelCard(render_gguf_card(repo_id="acme/tiny-GGUF", model="tiny", namespace="acme", source=source,
                                          artifacts=artifacts(tmp_path, figures), tokens=None,
                                          release=ReleaseInfo(license="apache-2.0")))
    assert (declared.data.base_model, declared.data.license) == ("org/tiny", "apache-2.0")
    assert declared.data.base_model_relation == "quantized"


@pytest.mark.slow
def test_the_prompt_format_is_shown_rendered_beside_the_jinja(tmp_path, tiny_models):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models("llama") / name, folder / name)
    (folder / "chat_template.jinja").write_text(CHATML)
    assert chat_example(folder) == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no') }}")
    assert chat_example(folder) is None  # a template that does not render leaves the Jinja alone in the card


@pytest.mark.parametrize(("config", "expected"), [
    ({"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05},
     {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "repeat_penalty": 1.05}),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 512},
     {"temperature": 0.6, "top_p": 0.95}),
    ({"do_sample": False, "temperature": 0.6}, {}),  # greedy decoding: no sampling values apply
    ({"temperature": None, "top_k": 0, "top_p": True}, {}),  # unset, "off", not a number
    ({"bos_token_id": 1, "eos_token_id": 2}, {}),
])
def test_ollama_params_come_from_the_generation_config(tmp_path, config, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert ollama_params(sampling_defaults(StepOutput(tmp_path, {"data": {"path": str(tmp_path)}}))) == expected


def test_nothing_published_names_a_local_directory(tmp_path):
    assert public_text_name(f"file:{tmp_path}/a.txt,/home/alice/b.txt") == "file:a.txt,b.txt"
    assert public_text_name("hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text") == \
        "hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text"
    assert public_text_name("builtin") == "builtin"
    data = {"path": "/home/alice/x.gguf", "imatrix": {"calibration": {"dataset": "file:/home/alice/c.txt"}},
            "fallbacks": [{"dataset": "file:/a/b.txt"}]}
    assert public_data(data) == {"imatrix": {"calibration": {"dataset": "file:c.txt"}},
                                 "fallbacks": [{"dataset": "file:b.txt"}]}
    # the last check before publishing refuses a generated file that names the source or the work dir
    source, work = tmp_path / "src", tmp_path / "work"
    card = tmp_path / "README.md"
    card.write_text(f"made from {source}\n")
    with pytest.raises(PublishError, match="source folder"):
        _refuse_local_paths([card], source, work / "logs" / "m.log")
    card.write_text(f"log at {work}/logs/m.log\n")
    with pytest.raises(PublishError, match="work dir"):
        _refuse_local_paths([card], source, work / "logs" / "m.log")
    card.write_text("made from a local checkpoint\n")
    _refuse_local_paths([card], source, work / "logs" / "m.log")


# ------------------------------------------------------------------------------------------ targets.yaml

MODEL = """
defaults:
  publish: {{to: 'dir:./out', namespace: acme}}
models:
  - name: m
    source: {source}
{extra}    formats: {{gguf: {{types: [Q8_0]}}}}
"""


@pytest.mark.parametrize(("extra", "fragment"), [
    ("    base_model: not-a-repo\n", "models[0].base_model: expected a Hub repo id"),
    ("    license: Apache-2.0\n", "did you mean 'apache-2.0'?"),
    ("    license: other\n", "license: other needs license_name and license_link"),
    ("    license: mit\n    license_name: mine\n", "license_name go with license: other"),
    ("    license: other\n    license_name: Mine License\n    license_link: LICENSE\n", "lowercase"),
    ("    license: other\n    license_name: mine\n    license_link: file:///x\n", "URL"),
])
def test_model_tree_and_licence_are_validated(write_targets, extra, fragment):
    with pytest.raises(ConfigError) as info:
        load_targets(write_targets(MODEL.format(source="./m", extra=extra)))
    assert fragment in str(info.value), str(info.value)


def test_base_model_is_declared_per_model_not_in_defaults(write_targets):
    path = write_targets("defaults:\n  base_model: org/x\nmodels:\n  - {name: m, source: ./m, formats: {gguf: {}}}\n")
    with pytest.raises(ConfigError, match=r"defaults\.base_model"):
        load_targets(path)
    ok = load_targets(write_targets(MODEL.format(source="./m", extra="    base_model: org/m\n    license: other\n"
                                                 "    license_name: m-license\n    license_link: LICENSE\n")))
    assert (ok.models[0].base_model, ok.models[0].license_link) == ("org/m", "LICENSE")


def test_validate_warns_of_repos_without_a_model_tree_or_licence(write_targets, tmp_path):
    from tiny_models import fake_checkpoint

    fake_checkpoint(tmp_path / "m")  # validate refuses a local source folder that is not a checkpoint
    bare = write_targets(MODEL.format(source="./m", extra=""))
    proc = quantforge("validate", str(bare))
    assert proc.returncode == 0, proc.stderr
    assert "ok (1 models, 1 artifacts)" in proc.stdout
    assert "warning: m: acme/m-GGUF would publish without base_model or license" in proc.stderr
    # a licence in the local folder's own card counts; a Hub source is its own base model
    (tmp_path / "m" / "README.md").write_text("---\nlicense: mit\n---\n")
    proc = quantforge("validate", str(bare))
    assert "would publish without base_model;" in proc.stderr and "base_model or license" not in proc.stderr
    hub = write_targets(MODEL.format(source="org/m", extra=""), name="hub.yaml")
    declared = write_targets(MODEL.format(source="./m", extra=f"    base_model: {BASE}\n    license: apache-2.0\n"),
                             name="declared.yaml")
    for path in (hub, declared):
        proc = quantforge("validate", str(path))
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_declaring_a_licence_changes_only_the_quantized_files_and_what_follows(write_targets, tmp_path, tiny_models):
    source = tiny_models("llama")

    def keys(extra: str) -> dict[str, str]:
        path = write_targets(f"""
            defaults:
              publish: {{to: 'dir:./out', namespace: acme}}
              calibration: {{samples: 8, seq_len: 64}}
            models:
              - name: m
                source: {source}
            {extra}
                formats: {{gguf: {{types: [Q4_K_M, Q8_0], imatrix: true}}, gptq: {{group_size: 32}}}}
            """)
        return {s.label: s.key for s in build_plan(load_targets(path), PlanContext(work=WorkDir(tmp_path / "w"))).steps}

    before = keys("")
    after = keys("    license: apache-2.0")
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {f"m/gguf/{t}:{s}" for t in ("Q4_K_M", "Q8_0") for s in ("quantize", "verify", "evaluate", "gate")
                       } | {"m/gguf:publish", "m/gptq:publish"}
    # the base model is also named inside the converted file: the conversion reruns, the torch work does not
    rebased = keys("    base_model: org/m")
    changed = {label for label in before if before[label] != rebased[label]}
    assert {"m/gguf:convert", "m/gguf:imatrix-file"} <= changed
    assert not changed & {"m:source", "m:calibration", "m/gguf:imatrix", "m:eval-tokens", "m:eval-reference",
                          "m/gptq:quantize", "m/gptq:verify", "m/gptq:evaluate"}


# ------------------------------------------------------------------------------- a build, published to a folder

@pytest.fixture(scope="module")
def release_build(tmp_path_factory, tiny_models):
    """A tiny Llama (rows of 256: K-quants and the matrix apply) with sampling defaults, calibrated on a local text
    file, built to GGUF (Q4_K_M weighted by an importance matrix, Q8_0 not) and GPTQ, and published to a folder,
    with HOME pointing at a folder that names a user."""
    from quantforge.toolchains.llamacpp import cache_root

    root = tmp_path_factory.mktemp("release")
    source = root / "checkpoints" / "tiny-llama"
    shutil.copytree(tiny_models("llama", hidden=256), source)
    generation = json.loads((source / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1)
    (source / "generation_config.json").write_text(json.dumps(generation))
    (root / "texts").mkdir()
    from pydoc_data.topics import topics

    (root / "texts" / "calib.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)))
    (root / "targets.yaml").write_text(
        "defaults:\n  publish: {to: 'dir:./out', namespace: acme}\n"
        "  calibration: {dataset: 'file:texts/calib.txt', samples: 8, seq_len: 64}\n"
        "  evaluation: {ctx: 64, chunks: 4, max_ppl_increase: {gguf: 0.5, gptq: 0.5}}\n"
        "models:\n  - name: tiny-llama\n    source: ./checkpoints/tiny-llama\n    base_model: acme/tiny-llama\n"
        "    license: apache-2.0\n"
        "    formats:\n      gguf: {types: [Q4_K_M, Q8_0], imatrix: true}\n      gptq: {group_size: 32}\n")
    home = root / "home" / "alice-quantforge-user"
    home.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "QUANTFORGE_CACHE": str(cache_root()), "HF_HUB_OFFLINE": "1"}
    proc = quantforge("build", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {s["label"]: s for s in json.loads(proc.stdout)["steps"]}
    return {"root": root, "source": source, "home": home, "steps": steps, "out": root / "out" / "acme", "env": env,
            "validate": quantforge("validate", str(root / "targets.yaml"), env=env)}


@pytest.mark.slow
def test_every_gguf_carries_its_provenance_and_the_weighted_ones_llama_cpp_imatrix_keys(release_build):
    from quantforge.toolchains.gguf_header import read_header
    from quantforge.toolchains.llamacpp import llama_cpp_version

    repo = release_build["out"] / "tiny-llama-GGUF"
    digest = release_build["steps"]["tiny-llama:source"]["data"]
    revision = json.loads((repo / "quantforge.json").read_text())["source"]["digest"]
    assert "path" in digest and len(revision) == 64
    layers = json.loads((release_build["source"] / "config.json").read_text())["num_hidden_layers"]
    for qtype in ("Q4_K_M", "Q8_0"):
        meta = read_header(repo / f"tiny-llama-{qtype}.gguf").metadata
        assert meta["general.name"] == "tiny-llama"
        assert meta["general.quantized_by"] == "acme"
        assert meta["general.repo_url"] == "https://huggingface.co/acme/tiny-llama-GGUF"
        assert meta["general.license"] == "apache-2.0"
        assert meta["general.base_model.count"] == 1
        assert meta["general.base_model.0.organization"] == "acme"
        assert meta["general.base_model.0.name"] == "tiny-llama"
        assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/acme/tiny-llama"
        assert meta["general.source.repo_url"] == "https://huggingface.co/acme/tiny-llama"
        assert meta["quantforge.version"] == __version__
        assert meta["quantforge.llama_cpp"] == f"llama-cpp-python=={llama_cpp_version()}"
        assert meta["quantforge.converter"] == f"llama-cpp-python=={llama_cpp_version()}"
        assert meta["quantforge.source.revision"] == revision
        assert meta["general.sampling.temp"] == pytest.approx(0.6)  # the converter's, from generation_config
        imatrix_keys = {k: v for k, v in meta.items() if k.startswith("quantize.imatrix.")}
        if qtype == "Q8_0":  # llama.cpp's Q8_0 takes no matrix, and says none
            assert imatrix_keys == {}
        else:
            assert imatrix_keys == {"quantize.imatrix.file": "tiny-llama-imatrix.gguf",
                                    "quantize.imatrix.dataset": "file:calib.txt",
                                    "quantize.imatrix.entries_count": 7 * layers,
                                    "quantize.imatrix.chunks_count": 8}
        recorded = release_build["steps"][f"tiny-llama/gguf/{qtype}:quantize"]["data"]["metadata"]
        assert recorded["general.license"] == "apache-2.0"


@pytest.mark.slow
def test_the_importance_matrix_is_published_in_llama_cpp_format_with_one_entry_per_weighted_tensor(release_build):
    from gguf import GGUFReader

    from quantforge.toolchains.gguf_header import read_header

    repo = release_build["out"] / "tiny-llama-GGUF"
    reader = GGUFReader(repo / "tiny-llama-imatrix.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["file:calib.txt"], "imatrix.chunk_count": 8,
                      "imatrix.chunk_size": 64}
    weighted = sorted(t.name.removesuffix(".in_sum2") for t in reader.tensors if t.name.endswith(".in_sum2"))
    q4 = read_header(repo / "tiny-llama-Q4_K_M.gguf")
    assert len(weighted) == q4.metadata["quantize.imatrix.entries_count"] == len(set(weighted))
    assert set(weighted) <= {t.name for t in q4.tensors}
    assert all(np_counts == [8 * 64] for np_counts in
               ([int(x) for x in t.data] for t in reader.tensors if t.name.endswith(".counts")))
    manifest = json.loads((repo / "quantforge.json").read_text())
    listed = manifest["repo_files"]["tiny-llama-imatrix.gguf"]
    assert listed["entries"] == len(weighted) and listed["dataset"] == "file:calib.txt"
    from quantforge.store import sha256_file

    assert listed["sha256"] == sha256_file(repo / "tiny-llama-imatrix.gguf")
    card = (repo / "README.md").read_text()
    assert "[tiny-llama-imatrix.gguf](./tiny-llama-imatrix.gguf)" in card
    assert "`llama-quantize --imatrix tiny-llama-imatrix.gguf …`" in card


@pytest.mark.slow
def test_cards_put_both_repos_in_the_model_tree_and_link_each_other(release_build):
    gguf_repo, gptq_repo = (release_build["out"] / f"tiny-llama-{f}" for f in ("GGUF", "GPTQ"))
    for repo, library in ((gguf_repo, "gguf"), (gptq_repo, "transformers")):
        card = ModelCard.load(repo / "README.md")
        assert isinstance(card.data, ModelCardData)
        assert card.data.base_model == "acme/tiny-llama" and card.data.base_model_relation == "quantized"
        assert card.data.license == "apache-2.0" and card.data.library_name == library
        assert {"base_model", "base_model_relation", "license"} <= set(front_matter(card.content))
    gguf_card, gptq_card = ((r / "README.md").read_text() for r in (gguf_repo, gptq_repo))
    assert "GPTQ ([acme/tiny-llama-GPTQ](https://huggingface.co/acme/tiny-llama-GPTQ))" in gguf_card
    assert "GGUF ([acme/tiny-llama-GGUF](https://huggingface.co/acme/tiny-llama-GGUF))" in gptq_card
    assert "**transformers** ≥ 4.32" in gptq_card and "`--quantize gptq`" in gptq_card
    assert "do not load GPTQ checkpoints: use [acme/tiny-llama-GGUF]" in gptq_card
    # Ollama's params, from the source's generation config
    assert json.loads((gguf_repo / "params").read_text()) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                              "repeat_penalty": 1.1}
    assert "## Sampling defaults" in gguf_card and "`repeat_penalty` 1.1" in gguf_card
    assert json.loads((gguf_repo / "quantforge.json").read_text())["release"] == {
        "base_model": "acme/tiny-llama", "license": "apache-2.0", "siblings": {"gptq": "acme/tiny-llama-GPTQ"}}
    assert release_build["validate"].returncode == 0 and "warning" not in release_build["validate"].stderr
    # `quantforge card` renders, from the work dir, what was published (the matrix file included)
    root = release_build["root"]
    rendered = quantforge("card", str(root / "targets.yaml"), "--work-dir", str(root / "work"), "--only",
                          "tiny-llama/gguf", env=release_build["env"])
    assert rendered.returncode == 0, rendered.stderr
    assert Path(rendered.stdout.strip()).read_text() == gguf_card


@pytest.mark.slow
def test_no_published_file_names_the_work_dir_home_source_or_caches(release_build):
    from quantforge.toolchains.llamacpp import cache_root

    root = release_build["root"]
    private = {"build folder": str(root), "source folder": str(release_build["source"].resolve()),
               "work dir": str((root / "work").resolve()), "home": str(release_build["home"]),
               "user name": "alice-quantforge-user", "quantforge cache": str(cache_root())}
    files = [p for p in release_build["out"].rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"tiny-llama-Q4_K_M.gguf", "tiny-llama-imatrix.gguf", "params", "README.md",
                                       "quantforge.json", "config.json", "model.safetensors"}
    for path in files:
        content = path.read_bytes()
        for what, place in private.items():
            assert place.encode() not in content, f"{path.relative_to(root)} names the {what}"
    manifest = json.loads((release_build["out"] / "tiny-llama-GGUF" / "quantforge.json").read_text())
    assert manifest["source"].keys() == {"digest"}  # a local source by its content, never its folder
