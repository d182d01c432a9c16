"""Adapter to GPTQModel (GPTQ and AWQ quantization) and to transformers as the checkpoints' consumer.

GPTQModel is the maintained successor of auto-gptq and AutoAWQ (both broken on transformers 5). Its work runs in
a child process (`gptqmodel_worker`): quantizing a 7B model holds tens of GB, and an out-of-memory kill must fail
one step, not the build. It runs in the step's folder, because GPTQModel writes a logs/ folder of its own
where it runs. The checks before it (shapes against the group size) run here, in a second, on a
model instantiated on torch's meta device (no weights are read).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import IncompatibleShapes, ToolchainError, VerificationError
from .pins import tool_version
from .quiet import output_to
from .worker import run_worker

PACKAGE = "gptqmodel"
WORKER = "quantforge.toolchains.gptqmodel_worker"
# GPTQModel's own progress bar: "Quantizing layer 3 of 29" (0-based index, last index)
_LAYER = re.compile(r"Quantizing layer (\d+) of (\d+)")
# GPTQModel's AWQ clip search walks output rows in batches of 64 (or 256) and asserts they divide evenly
AWQ_OUTPUT_MULTIPLE = 64


def gptqmodel_version() -> str:
    # installed, or pinned by the constraints file a nightly's legs install with (a plan job has no tools)
    return tool_version(PACKAGE)


def quantized_linears(source_dir: Path, trust_remote_code: bool = False, log_path: Path | None = None
                      ) -> tuple[dict[str, tuple[int, int]], int]:
    """name -> (in_features, out_features) of every linear layer GPTQModel quantizes (all but the output head),
    and the model's parameter count. Runs in this process (a meta-device model costs no memory); what torch and
    transformers print meanwhile goes to `log_path`."""
    with output_to(log_path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    layers = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head}
    return layers, sum(p.numel() for p in model.parameters())  # tied weights are counted once


def check_shapes(method: str, group_size: int, layers: dict[str, tuple[int, int]]) -> None:
    """Raise IncompatibleShapes naming the first layer whose shape the settings cannot quantize, and the group
    sizes that would work."""
    if not layers:
        raise IncompatibleShapes("the model has no linear layers to quantize")
    if group_size > 0:
        bad = [(name, n_in) for name, (n_in, _) in layers.items() if n_in % group_size]
        if bad:
            name, n_in = bad[0]
            common = math.gcd(*(n_in for n_in, _ in layers.values()))
            working = [g for g in (16, 32, 64, 128, 256, 512, 1024) if common % g == 0]
            if method == "gptq":
                working.append(-1)
            others = f" and {len(bad) - 1} more layer{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
            raise IncompatibleShapes(
                f"group_size {group_size} does not divide the input size {n_in} of {name}{others}",
                hint=f"group sizes that divide every layer: {', '.join(map(str, working)) or 'none'}")
    if method == "awq":
        bad_out = [(name, n_out) for name, (_, n_out) in layers.items() if n_out % AWQ_OUTPUT_MULTIPLE]
        if bad_out:
            name, n_out = bad_out[0]
            raise IncompatibleShapes(
                f"AWQ needs output sizes that are multiples of {AWQ_OUTPUT_MULTIPLE}; {name} has {n_out}",
                hint="quantize this model with GPTQ instead")


def quantize(method: str, source_dir: Path, out_dir: Path, calibration: Path, config: dict[str, Any],
             trust_remote_code: bool, log_path: Path, scratch: Path, progress=None) -> dict[str, Any]:
    """Quantize `source_dir` into a checkpoint folder `out_dir` with GPTQModel; `config` is GPTQModel's
    QuantizeConfig arguments, as the format's settings model gives them."""
    args = ["quantize", str(source_dir), str(out_dir), "--method", method, "--calibration", str(calibration),
            "--config", json.dumps(config, sort_keys=True), "--scratch", str(scratch)]
    args += ["--trust-remote-code"] if trust_remote_code else []

    def layer(m: re.Match[str]) -> str:
        return f"layer {int(m[1]) + 1}/{int(m[2]) + 1}"

    result = run_worker(WORKER, args, log_path, scratch / "quantize.result.json", progress=progress,
                        patterns=[(_LAYER, layer)], env=_env(), cwd=scratch)
    if not result.pop("ok", False):
        raise ToolchainError(f"GPTQModel {method} quantization failed: {result.get('error', 'unknown')}")
    return result


def load_and_generate(checkpoint: Path, prompt: str, n_tokens: int, log_path: Path, scratch: Path,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """Check by the real consumer: transformers loads the checkpoint (GPTQModel kernels) and generates."""
    args = ["generate", str(checkpoint), "--prompt", prompt, "--tokens", str(n_tokens)]
    args += ["--trust-remote-code"] if trust_remote_code else []
    result = run_worker(WORKER, args, log_path, scratch / "generate.result.json", env=_env(), cwd=scratch)
    if not result.pop("ok", False):
        raise VerificationError(f"transformers could not run {checkpoint.name}: {result.get('error', 'unknown')}")
    return result


def evaluate(checkpoint: Path, windows: Path, reference: Path, sample: Path | None, log_path: Path,
             scratch: Path, trust_remote_code: bool = False, progress=None) -> dict[str, Any]:
    """Perplexity, KL divergence and top-1 agreement of the checkpoint in transformers, on the given windows."""
    args = ["evaluate", str(checkpoint), "--windows", str(windows), "--reference", str(reference)]
    args += ["--trust-remote-code"] if trust_remote_code else []
    if sample is not None:
        args += ["--sample", str(sample)]
    result = run_worker(WORKER, args, log_path, scratch / "evaluate.result.json", progress=progress, env=_env(),
                        cwd=scratch)
    if not result.pop("ok", False):
        raise VerificationError(f"transformers could not evaluate {checkpoint.name}: "
                                f"{result.get('error', 'unknown')}")
    return result


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # GPTQModel sizes a CPU worker pool that must hold at least 2 workers, even on a 2-core machine
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
