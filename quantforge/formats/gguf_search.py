"""A searched GGUF variant (`variants: {Q4_K_X: {budget: {bpw: 4.5}}}`): every tensor's type chosen to lose the
least to the source within a size budget.

    gguf.convert ─┬─► gguf.sensitivity ─► gguf.quantize[variant] ─► verify ─► evaluate ─► variant gate
    calibration ──┤   (one per model: every budget, and every rerun, reuses it)
    gguf.imatrix ─┘

Sensitivity (this module): the tensors llama.cpp quantizes are grouped by kind and depth (attn_q of the first
quarter of the layers, …; the output and the token embeddings alone). Each group is quantized alone to the two
lowest types of its ladder, everything else at Q8_0, and its mean KL divergence is measured against the
full-precision GGUF on search windows. A file all at Q8_0 gives the baseline. The search windows are calibration
windows, never the evaluation's: the figures a card reports are not the ones the search optimised. Cost: two
quantize+evaluate runs per group, one for the baseline, and one pass of the full-precision file.

Allocation: gguf_allocation.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config.schema import ModelTarget
from ..core.registry import step_kind
from ..core.step import Step, StepContext
from ..steps.calibration import CALIBRATION_FILE
from ..toolchains import llamacpp
from ..toolchains.gguf_header import TensorInfo, read_header
from ..toolchains.gguf_header import tensor_bytes as type_bytes
from ..toolchains.llamacpp import TensorTypes
from . import gguf_costs
from .gguf_imatrix import IMATRIX_FILE
from .gguf_recipes import EMBEDDINGS, KV_MAX, OUTPUT, TENSOR_TYPES, quantizable
from .gguf_release import INTERMEDIATE_FILE

SENSITIVITY_KIND = "gguf.sensitivity"
BASELINE = "Q8_0"
# Types a group may take, cheapest first. llama.cpp's K-quants store rows in blocks of 256; a tensor whose rows
# are not a multiple of 256 (SmolLM2's 576) would fall back to another type, so it gets the 32-block ladder.
K_LADDER = ("Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
ROW32_LADDER = ("IQ4_NL", "Q5_0", "Q5_1", "Q8_0")
PROBES = 2  # types measured per group: the two cheapest of its ladder
BANDS = 4  # depth bands of the layers: a group is one kind of tensor in one band
WINDOWS = 4  # calibration windows the search scores on
_LAYER = re.compile(r"blk\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class Group:
    """Tensors that take one type together."""

    name: str  # "ffn_down 0-7", "output", "token_embd"
    role: str  # what a rule sets: "output", "embeddings", or the kind of tensor in blk.N.<role>.weight
    layers: tuple[int, ...]
    tensors: tuple[str, ...]
    elements: int
    ladder: tuple[str, ...]

    def tensor_types(self, qtype: str) -> TensorTypes:
        """The rules that set this group alone to `qtype` (every other tensor follows the file type)."""
        if self.role == "output":
            return TensorTypes(output=qtype)
        if self.role == "embeddings":
            return TensorTypes(embeddings=qtype)
        return TensorTypes(patterns=tuple((p, qtype) for p in layer_patterns(self.role, self.layers)))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "layers": list(self.layers), "tensors": list(self.tensors),
                "elements": self.elements, "ladder": list(self.ladder)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Group:
        return cls(data["name"], data["role"], tuple(data["layers"]), tuple(data["tensors"]), data["elements"],
                   tuple(data["ladder"]))


def bits(qtype: str) -> float:
    return type_bytes(qtype, 256 * 32) * 8 / (256 * 32)


def ladder(columns: Sequence[int]) -> tuple[str, ...] | None:
    if all(c % 256 == 0 for c in columns):
        return K_LADDER
    if all(c % 32 == 0 for c in columns):
        return ROW32_LADDER
    return None  # rows no quantized type holds: llama.cpp decides, the search leaves it alone


def tensor_groups(tensors: Sequence[TensorInfo], bands: int = BANDS) -> list[Group]:
    """The groups a search allocates types to, in a stable order: the embeddings, the output, then each kind of
    layer tensor by depth band."""
    layered: dict[str, list[tuple[int, TensorInfo]]] = {}
    alone: list[tuple[str, str, TensorInfo]] = []
    for t in tensors:
        if not quantizable(t.name, len(t.shape)):
            continue
        if t.name in (EMBEDDINGS, OUTPUT):
            alone.append(("token_embd" if t.name == EMBEDDINGS else "output",
                          "embeddings" if t.name == EMBEDDINGS else "output", t))
        elif m := _LAYER.match(t.name):
            layered.setdefault(m.group(2), []).append((int(m.group(1)), t))
    groups = [Group(name, role, (), (t.name,), t.n_elements, rungs)
              for name, role, t in sorted(alone, key=lambda a: a[0], reverse=True)
              if (rungs := ladder([t.shape[0]])) is not None]
    n_layers = 1 + max((layer for kind in layered.values() for layer, _ in kind), default=-1)
    bands = max(1, min(bands, n_layers))
    for role, members in sorted(layered.items()):
        for band in range(bands):
            chosen = sorted((layer, t) for layer, t in members if layer * bands // n_layers == band)
            rungs = ladder([t.shape[0] for _, t in chosen])
            if not chosen or rungs is None:
                continue
            layers = tuple(layer for layer, _ in chosen)
            groups.append(Group(f"{role} {layers[0]}-{layers[-1]}", role, layers, tuple(t.name for _, t in chosen),
                                sum(t.n_elements for _, t in chosen), rungs))
    return groups


# a rule is written into the file as PATTERN=TYPE, in a GGUF string of at most KV_MAX bytes
PATTERN_BYTES = KV_MAX - 1 - max(map(len, TENSOR_TYPES))


def layer_patterns(role: str, layers: Sequence[int]) -> list[str]:
    """Patterns (C++ ECMAScript regular expressions, searched) that match blk.N.<role>.weight for exactly these
    layers, each short enough to be recorded in the file."""
    out: list[str] = []
    chunk: list[str] = []
    tail = rf"\.{re.escape(role)}\.weight"

    def pattern(numbers: list[str]) -> str:
        return rf"blk\.({'|'.join(numbers)}){tail}"

    for layer in layers:
        if chunk and len(pattern([*chunk, str(layer)])) > PATTERN_BYTES:
            out.append(pattern(chunk))
            chunk = []
        chunk.append(str(layer))
    if chunk:
        out.append(pattern(chunk))
    return out


# ------------------------------------------------------------------------------------------------- the step

def sensitivity_step(model: ModelTarget, convert: Step, calibration: Step, imatrix: Step | None,
                     libllama: str) -> Step:
    inputs = {"intermediate": convert, "calibration": calibration}
    if imatrix is not None:
        inputs["imatrix"] = imatrix
    return Step(SENSITIVITY_KIND, f"{model.name}/gguf:sensitivity",
                params={"bands": BANDS, "windows": WINDOWS, "probes": PROBES, "baseline": BASELINE,
                        "ladders": [list(K_LADDER), list(ROW32_LADDER)], "reference": "intermediate"},
                inputs=inputs, tools={"libllama": libllama}, model=model.name, fmt="gguf")


@step_kind(SENSITIVITY_KIND, version="1", estimates=gguf_costs.SENSITIVITY)
def run_sensitivity(step: Step, ctx: StepContext) -> dict[str, Any]:
    started = time.perf_counter()
    intermediate = ctx.inputs["intermediate"].file(INTERMEDIATE_FILE)
    header = read_header(intermediate)
    groups = tensor_groups(header.tensors, step.params["bands"])
    windows = ctx.out_dir / "windows.npy"
    scored = np.load(ctx.inputs["calibration"].file(CALIBRATION_FILE))[:step.params["windows"]]
    np.save(windows, scored)
    imatrix = None
    if "imatrix" in ctx.inputs:
        converter = llamacpp.provision_converter(ctx.options.llama_cpp_dir)
        imatrix = (ctx.inputs["imatrix"].file(IMATRIX_FILE), converter.root / "gguf-py")
    threads = ctx.options.threads
    reference = ctx.out_dir / "reference.npz"
    ctx.progress("reference")
    llamacpp.probe(intermediate, windows, ctx.log_path, ctx.out_dir, threads, write_reference=reference)
    probe_file = ctx.out_dir / "probe.gguf"
    runs = 0

    def measure(tensor_types: TensorTypes | None) -> float:
        nonlocal runs
        llamacpp.quantize(intermediate, probe_file, step.params["baseline"], ctx.log_path, threads, imatrix=imatrix,
                          tensor_types=tensor_types)
        runs += 1
        return llamacpp.probe(probe_file, windows, ctx.log_path, ctx.out_dir, threads, reference=reference)["kld_mean"]

    ctx.progress("baseline")
    baseline = measure(None)
    baseline_size = probe_file.stat().st_size
    measured = []
    for i, group in enumerate(groups):
        ctx.progress(f"group {i + 1}/{len(groups)}: {group.name}")
        measured.append({**group.to_json(), "kld": {t: measure(group.tensor_types(t))
                                                    for t in group.ladder[:step.params["probes"]]}})
    # what the groups do not decide (other tensors, metadata): the baseline's size less its groups' tensors
    stored = {t.name: t for t in read_header(probe_file).tensors}
    fixed = baseline_size - sum(type_bytes(stored[name].type_name, stored[name].n_elements)
                                for g in groups for name in g.tensors)
    probe_file.unlink()
    return {"groups": measured, "baseline": {"type": step.params["baseline"], "kld": baseline,
                                             "size": baseline_size, "fixed_bytes": fixed},
            "n_params": sum(t.n_elements for t in header.tensors), "tensors": len(header.tensors),
            "windows": int(scored.shape[0]), "runs": runs,
            "seconds": round(time.perf_counter() - started, 1)}
