"""The budgeted search (issue 21): GGUF variants whose tensor types a search chooses within a size budget. The
allocation is checked against brute force, the groups and patterns against what llama.cpp matches, and a real
build of a tiny model shows the result within its budget, its sensitivity step reused by a second budget, and a
rerun doing nothing."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gguf_recipes import config_errors, targets

from quantforge.core.step import PlanContext
from quantforge.formats.gguf_allocation import ALIGNMENT, BudgetTooSmall, allocate, increases, knapsack, searched_recipe
from quantforge.formats.gguf_search import (
    K_LADDER,
    PATTERN_BYTES,
    ROW32_LADDER,
    Group,
    layer_patterns,
    tensor_groups,
    type_bytes,
)
from quantforge.pipeline import build_plan, load_targets
from quantforge.store import WorkDir
from quantforge.toolchains.gguf_header import TensorInfo

# ------------------------------------------------------------------------------------------ the allocation


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 60), st.floats(0, 1)), min_size=1, max_size=4), min_size=1,
                max_size=5), st.integers(1, 300))
def test_the_knapsack_finds_the_least_loss_that_fits(options, room):
    cost = [[c for c, _ in group] for group in options]
    loss = [[d for _, d in group] for group in options]
    fits = [combo for combo in itertools.product(*(range(len(g)) for g in cost))
            if sum(cost[k][i] for k, i in enumerate(combo)) <= room]
    if not fits:
        return
    best = min(sum(loss[k][i] for k, i in enumerate(combo)) for combo in fits)
    choice = knapsack(cost, loss, room)
    assert sum(cost[k][i] for k, i in enumerate(choice)) <= room
    # the grid is as fine as a unit of cost here (room < 8192), so the optimum is exact
    assert sum(loss[k][i] for k, i in enumerate(choice)) == pytest.approx(best)


def test_a_group_loses_less_with_every_bit_and_nothing_at_q8_0():
    group = {"ladder": list(K_LADDER), "kld": {"Q3_K": 0.5 + 0.04, "Q4_K": 0.5 + 0.01}}
    out = increases(group, 0.5)
    assert out[:2] == pytest.approx([0.04, 0.01]) and out[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(out)) and out[2] < 0.01
    # a probe's noise (the better type measured worse, below the baseline) is no signal
    noisy = increases({"ladder": list(ROW32_LADDER), "kld": {"IQ4_NL": 0.49, "Q5_0": 0.52}}, 0.5)
    assert noisy == [0.0, 0.0, 0.0, 0.0]


def profile(groups: list[Group], klds: list[dict[str, float]], fixed: int = 1000) -> dict:
    return {"groups": [{**g.to_json(), "kld": k} for g, k in zip(groups, klds, strict=True)],
            "baseline": {"type": "Q8_0", "kld": 0.001, "size": 0, "fixed_bytes": fixed},
            "n_params": sum(g.elements for g in groups), "tensors": sum(len(g.tensors) for g in groups),
            "runs": 2 * len(groups) + 1, "seconds": 1.0}


def test_the_sensitive_group_gets_the_bits():
    groups = [Group(f"{role} 0-1", role, (0, 1), (f"blk.0.{role}.weight", f"blk.1.{role}.weight"), 2**20, K_LADDER)
              for role in ("ffn_down", "ffn_up")]
    data = profile(groups, [{"Q3_K": 0.101, "Q4_K": 0.031}, {"Q3_K": 0.0011, "Q4_K": 0.00105}])
    limit = 1000 + ALIGNMENT * 4 + type_bytes("Q6_K", 2**20) + type_bytes("Q3_K", 2**20)
    allocation = allocate(data, {"size": limit})
    assert allocation.types == {"ffn_down 0-1": "Q6_K", "ffn_up 0-1": "Q3_K"}
    assert 1000 + allocation.tensor_bytes <= limit
    recipe = searched_recipe("Q4_K_X", "Q4_K_M", allocation, groups)
    assert recipe.tensors == ((r"blk\.(0|1)\.ffn_down\.weight", "Q6_K"), (r"blk\.(0|1)\.ffn_up\.weight", "Q3_K"))
    with pytest.raises(BudgetTooSmall, match=r"below the smallest file this search makes for the model"):
        allocate(data, {"size": 1000 + 2 * type_bytes("Q3_K", 2**20) - 1})


def test_groups_by_kind_and_depth_with_a_ladder_the_rows_fit():
    tensors = [TensorInfo("token_embd.weight", (576, 49152), "F16"), TensorInfo("output_norm.weight", (576,), "F32")]
    for layer in range(30):
        tensors += [TensorInfo(f"blk.{layer}.attn_q.weight", (576, 576), "F16"),
                    TensorInfo(f"blk.{layer}.ffn_down.weight", (1536, 576), "F16"),
                    TensorInfo(f"blk.{layer}.attn_norm.weight", (576,), "F32")]
    groups = {g.name: g for g in tensor_groups(tensors)}
    assert list(groups) == ["token_embd", "attn_q 0-7", "attn_q 8-14", "attn_q 15-22", "attn_q 23-29",
                            "ffn_down 0-7", "ffn_down 8-14", "ffn_down 15-22", "ffn_down 23-29"]
    assert groups["token_embd"].ladder == ROW32_LADDER and groups["attn_q 0-7"].ladder == ROW32_LADDER
    assert groups["ffn_down 8-14"].ladder == K_LADDER and groups["ffn_down 8-14"].elements == 7 * 1536 * 576
    assert sorted(n for g in groups.values() for n in g.tensors) == sorted(
        t.name for t in tensors if not t.name.endswith("norm.weight"))


@pytest.mark.parametrize("layers", [(0,), (1, 2, 3), tuple(range(0, 64)), (5, 50, 7)])
def test_layer_patterns_match_exactly_those_layers_and_fit_the_file(layers):
    patterns = layer_patterns("ffn_down", layers)
    names = [f"blk.{i}.ffn_down.weight" for i in range(100)] + ["blk.1.ffn_down_exps.weight", "blk.1.attn_q.weight"]
    matched = {n for n in names for p in patterns if re.search(p, n)}
    assert matched == {f"blk.{i}.ffn_down.weight" for i in layers}
    assert all(len(f"{p}=Q4_K".encode()) <= PATTERN_BYTES + 7 for p in patterns)


# ------------------------------------------------------------------------------------------ targets.yaml

@pytest.mark.parametrize(("variants", "fragment"), [
    ("          Q4_K_X: {budget: {bpw: 4.5}, output: Q8_0}\n", "a search chooses every tensor's type; leave out"),
    ("          Q4_K_X: {budget: {}}\n", "give one of bpw (bits per weight, e.g. 4.5) or size (e.g. 4.2GB)"),
    ("          Q4_K_X: {budget: {bpw: 2}}\n", "greater than or equal to 3.5"),
    ("          Q4_K_X: {budget: {size: lots}}\n", "'lots': expected a size such as 4.2GB"),
    ("          F16_X: {budget: {bpw: 5}}\n", "its name starts with no quantized type"),
])
def test_a_bad_budget_is_named(write_targets, tmp_path, variants, fragment):
    errors = config_errors(targets(write_targets, tmp_path, "[Q4_K_M]", variants))
    assert any(fragment in e for e in errors), errors


def test_budgets_share_one_sensitivity_step(write_targets, tmp_path):
    path = targets(write_targets, tmp_path, "[Q4_K_M, Q8_0]",
                   "          Q4_K_X: {budget: {bpw: 4.5}}\n          Q3_K_X: {budget: {size: 3.1GB}}\n")
    plan = build_plan(load_targets(path), PlanContext(WorkDir(tmp_path / "work"), offline=True))
    by_label = {s.label: s for s in plan.steps}
    sensitivity = by_label["m/gguf:sensitivity"]
    x, y = by_label["m/gguf/Q4_K_X:quantize"], by_label["m/gguf/Q3_K_X:quantize"]
    assert x.inputs["sensitivity"] is sensitivity is y.inputs["sensitivity"]
    assert x.params["budget"] == {"bpw": 4.5} and y.params["budget"] == {"size": 3_100_000_000}
    assert (x.params["type"], y.params["type"]) == ("Q4_K_M", "Q3_K_M")
    assert sensitivity.inputs["imatrix"] is by_label["m/gguf:imatrix"]
    assert "sensitivity" not in by_label["m/gguf/Q4_K_M:quantize"].inputs
    # a searched variant is judged against the stock frontier like any other
    assert by_label["m/gguf/Q4_K_X:gate"].kind == "gguf.variant_gate"


# ------------------------------------------------------------------------------------------ a real build

SEARCH = r"""
defaults:
  publish: {to: 'dir:./out', namespace: t}
  evaluation: {ctx: 64, chunks: 4, tokenizer_check: false, max_ppl_increase: {gguf: 0.5}}
  calibration: {samples: 8, seq_len: 64}
models:
  - name: tiny
    source: SOURCE
    formats:
      gguf:
        imatrix: true
        types: [Q4_K_M, Q8_0]
        variants:
          Q4_K_X: {budget: {bpw: 5.0}}
"""


def quantforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantforge.cli", *args], capture_output=True, text=True)


def statuses(root: Path) -> dict[str, str]:
    latest = json.loads((root / "work" / "reports" / "latest.json").read_text())
    return {s["label"]: s["status"] for s in latest["steps"]}


@pytest.mark.slow
def test_a_budgeted_search_fits_its_budget_and_reuses_its_sensitivity(tmp_path, tiny_models):
    from quantforge.toolchains.gguf_header import read_header

    source = tiny_models("mistral", hidden=256, tied=False)
    (tmp_path / "targets.yaml").write_text(SEARCH.replace("SOURCE", str(source)))
    proc = quantforge("build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"), "--no-gate")
    assert proc.returncode == 0, proc.stderr
    repo = tmp_path / "out" / "t" / "tiny-GGUF"
    manifest = json.loads((repo / "quantforge.json").read_text())
    record = manifest["artifacts"]["Q4_K_X"]["artifact"]
    search = record["recipe"]["search"]
    header = read_header(repo / "tiny-Q4_K_X.gguf")
    n_params = sum(t.n_elements for t in header.tensors)
    assert record["size"] * 8 / n_params <= 5.0 and search["limit_bytes"] == int(5.0 * n_params / 8)
    # every tensor holds the type the search chose for its group, and the file says how it was made
    chosen = {name: search["types"][group] for group, name in _members(search, header)}
    assert chosen and all(t.type_name == chosen[t.name] for t in header.tensors if t.name in chosen)
    assert len(set(chosen.values())) > 1  # a mix, not one type
    recipe = json.loads(header.metadata["quantforge.recipe"])
    assert recipe["name"] == "Q4_K_X" and recipe["tensor_types"] >= 1
    assert search["runs"] == 2 * search["groups"] + 1 and search["groups"] == 16  # 7 kinds x 2 layers, 2 alone
    card = (repo / "README.md").read_text()
    assert "Types searched within 5 bits per weight" in card
    assert f"{search['runs']} quantize+evaluate runs" in card

    # a second budget: only its own steps run, on the same sensitivity
    text = SEARCH.replace("SOURCE", str(source)) + "          Q3_K_X: {budget: {size: 9MB}}\n"
    (tmp_path / "targets.yaml").write_text(text)
    proc = quantforge("build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"), "--no-gate")
    assert proc.returncode == 0, proc.stderr
    status = statuses(tmp_path)
    assert status["tiny/gguf:sensitivity"] == "reused" and status["tiny/gguf/Q4_K_X:quantize"] == "reused"
    assert status["tiny/gguf/Q3_K_X:quantize"] == "built"
    assert (repo / "tiny-Q3_K_X.gguf").stat().st_size <= 9_000_000
    # and a rerun does nothing
    proc = quantforge("build", str(tmp_path / "targets.yaml"), "--work-dir", str(tmp_path / "work"), "--no-gate")
    assert proc.returncode == 0, proc.stderr
    assert set(statuses(tmp_path).values()) == {"reused"}


def _members(search: dict, header) -> list[tuple[str, str]]:
    """(group, tensor) for every tensor of the file a group of the search covers."""
    out = []
    for group in search["types"]:
        role, _, layers = group.partition(" ")
        if not layers:
            out.append((group, "output.weight" if role == "output" else "token_embd.weight"))
            continue
        first, last = map(int, layers.split("-"))
        out += [(group, t.name) for t in header.tensors
                if (m := re.match(rf"blk\.(\d+)\.{role}\.weight$", t.name)) and first <= int(m.group(1)) <= last]
    return out
