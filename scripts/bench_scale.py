"""Benchmark: how a build's memory, disk and time grow with the model. Random-weight checkpoints of Llama and Qwen2
shapes (with their family's real tokenizer, as tests/tiny_models.py pairs them) at growing sizes, each built to
GGUF Q8_0 and Q4_K_M with an importance matrix and evaluated on a few windows; per size, every heavy step's peak
RSS (its own process tree, sampled), the peak size of the work dir on disk and the wall times; across sizes, the
slope of each step's peak RSS against the model's bf16 bytes. With --limit, the biggest size is built again
inside a cgroup memory limit (v1 or v2, detected; needs root), to show the build completing under it.

    .venv/bin/python scripts/bench_scale.py [--sizes 0.1B,0.5B] [--families qwen2,llama] [--chunks 4 --ctx 256]
                                            [--samples 4 --seq-len 256] [--path auto|whole-model|streamed]
                                            [--limit auto|none|SIZE] [--root DIR]

Sizes: 0.1B, 0.5B, 1.5B, 3B (parameters, embeddings included; the vocabulary is the family's, 128k or 152k, so
small models are mostly embedding). A checkpoint is written shard by shard as bf16 safetensors without ever
holding the whole model, and kept under --root for the next run. Gates are off: random weights predict nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from cgroups import Cgroup, CgroupUnavailable, memory_cgroup  # noqa: E402  (tests/: shared with the tests)

# family -> size -> config (real models' shapes where one exists: Qwen2.5-0.5B/1.5B/3B, Llama-3.2-3B)
SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "qwen2": {
        "0.1B": {"hidden_size": 512, "intermediate_size": 2816, "num_hidden_layers": 6, "num_attention_heads": 8,
                 "num_key_value_heads": 2},
        "0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2},
        "1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                 "num_attention_heads": 12, "num_key_value_heads": 2},
        "3B": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
               "num_key_value_heads": 2},
    },
    "llama": {
        "0.1B": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 2},
        "0.5B": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "num_key_value_heads": 4},
        "1.5B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 20, "num_attention_heads": 32,
                 "num_key_value_heads": 8},
        "3B": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
               "num_key_value_heads": 8},
    },
}
# what the build process itself holds (torch and transformers imported, the tokenizer run): measured 0.5-0.65 GB
BUILD_PROCESS_BYTES = 650 * 10**6
# process command line -> the step it is (the build process itself is "build")
ROLES = (("torch_worker reference", "eval.reference"), ("torch_worker imatrix", "gguf.imatrix"),
         ("convert_hf_to_gguf", "gguf.convert"), ("llamacpp_worker quantize", "gguf.quantize"),
         ("llamacpp_worker --serve", "gguf.quantize"),  # one served worker runs the quantizations
         ("llamacpp_worker generate", "gguf.verify"), ("llamacpp_worker evaluate", "gguf.evaluate"))


# ------------------------------------------------------------------------------------------ checkpoints

def write_random_checkpoint(config: Any, dest: Path, *, tokenizer: Any = None, shard_bytes: int = 1 << 30,
                            seed: int = 0) -> int:
    """Random weights for `config` (a transformers config) as bf16 safetensors shards, one shard in memory at a
    time; returns the bytes written. Norm weights are 1, biases 0, other weights N(0, 0.02): a well-conditioned
    forward pass, like a freshly initialised model."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config.dtype = torch.bfloat16  # config.json says bf16: the converter writes a bf16 intermediate, as for a release
    with torch.device("meta"):  # names and shapes only; tied weights listed once, as save_pretrained writes them
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = [(name, tuple(p.shape)) for name, p in skeleton.named_parameters()]
    config.architectures = [type(skeleton).__name__]  # what save_pretrained records; the converter reads it
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    dest.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += 2 * tensors[name].numel()
        save_file(tensors, dest / file, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (dest / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return total


def family_checkpoint(family: str, size: str, root: Path) -> Path:
    import transformers
    from tiny_models import FAMILIES
    from transformers import AutoTokenizer

    from quantforge.toolchains.llamacpp import provision_converter

    dest = root / f"{family}-{size}"
    if (dest / "config.json").is_file():
        return dest
    config_cls, vocab_file, extra = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(provision_converter().vocab_dir, gguf_file=vocab_file)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra, **SHAPES[family][size])
    partial = dest.with_name(dest.name + ".partial")
    write_random_checkpoint(config, partial, tokenizer=tokenizer)
    partial.rename(dest)
    return dest


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------- builds

@dataclass
class Run:
    wall: float = 0.0
    returncode: int = 0
    peaks: dict[str, int] = field(default_factory=dict)  # role -> peak RSS of its processes
    disk_peak: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""


def _role(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline)
    for marker, role in ROLES:
        first, _, second = marker.partition(" ")
        if first in text and (not second or f" {second} " in f"{text} "):
            return role
    return None


def _disk(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def build(targets: Path, work: Path, env: dict[str, str], cgroup: Cgroup | None = None) -> Run:
    """`quantforge build` in a child (inside `cgroup` from its first instruction), sampling the RSS of each of
    its processes by role every 0.2 s (each process's own high-water mark, so spikes between samples count) and
    the work dir's size every second."""
    import psutil

    from quantforge.toolchains.memory import high_water_rss

    def join() -> None:  # runs in the child before exec: all it allocates counts against the limit
        if cgroup is not None:
            cgroup.procs.write_text(str(os.getpid()))

    for previous in (work, targets.parent / "out"):  # every step runs: a benchmark measures, it does not reuse
        shutil.rmtree(previous, ignore_errors=True)
    run = Run()
    started = time.perf_counter()
    out_file, err_file = targets.with_name("build.json"), targets.with_name("build.stderr")
    with open(out_file, "w") as out, open(err_file, "w") as err:  # files, not pipes: nothing can fill up and block
        proc = subprocess.Popen([sys.executable, "-m", "quantforge.cli", "build", str(targets), "--work-dir",
                                 str(work), "--no-gate", "--json"], stdout=out, stderr=err, env=env,
                                preexec_fn=join)
    root = psutil.Process(proc.pid)
    last_disk = 0.0
    while proc.poll() is None:
        usage: dict[str, int] = {}
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                role = "build" if p.pid == proc.pid else _role(p.cmdline()) or "other"
                usage[role] = usage.get(role, 0) + (high_water_rss(p.pid) or p.memory_info().rss)
            except psutil.Error:
                pass
        for role, rss in usage.items():
            run.peaks[role] = max(run.peaks.get(role, 0), rss)
        if time.monotonic() - last_disk > 1.0 and work.is_dir():
            run.disk_peak = max(run.disk_peak, _disk(work))
            last_disk = time.monotonic()
        time.sleep(0.2)
    run.wall = time.perf_counter() - started
    stdout, run.stderr = out_file.read_text(), err_file.read_text()
    run.returncode = proc.returncode
    run.disk_peak = max(run.disk_peak, _disk(work) if work.is_dir() else 0)
    try:
        run.report = json.loads(stdout)
    except ValueError:
        run.report = {}
    return run


def targets_file(dest: Path, name: str, source: Path, args: argparse.Namespace) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "targets.yaml"
    path.write_text("\n".join([
        "defaults:",
        "  publish: {to: 'dir:./out', namespace: bench}",
        f"  calibration: {{samples: {args.samples}, seq_len: {args.seq_len}}}",
        f"  evaluation: {{ctx: {args.ctx}, chunks: {args.chunks}}}",
        "models:",
        f"  - name: {name}",
        f"    source: {source}",
        "    formats: {gguf: {types: [Q8_0, Q4_K_M], imatrix: true}}", ""]))
    return path


# ------------------------------------------------------------------------------------------------ report

def step_rows(run: Run) -> dict[str, dict[str, Any]]:
    """kind -> the heaviest step of that kind: recorded peak, seconds, path."""
    rows: dict[str, dict[str, Any]] = {}
    for step in run.report.get("steps", []):
        data = step.get("data") or {}
        kind = step["kind"]
        row = rows.setdefault(kind, {"recorded": 0, "seconds": 0.0, "path": ""})
        row["recorded"] = max(row["recorded"], data.get("peak_rss_bytes") or 0)
        row["seconds"] += step.get("seconds") or 0.0
        row["path"] = data.get("path", row["path"])
    return rows


def print_run(label: str, model_bytes: int, run: Run) -> None:
    from quantforge.figures import format_size

    rows = step_rows(run)
    status = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
    print(f"\n## {label}: bf16 weights {format_size(model_bytes)}; build {status} in {run.wall:.0f} s; "
          f"work dir peak {format_size(run.disk_peak)}")
    print(f"| {'step':<15} | {'peak RSS (sampled)':>18} | {'peak RSS (recorded)':>19} | {'× bf16':>6} | "
          f"{'seconds':>7} | path")
    print(f"|{'-' * 17}|{'-' * 20}|{'-' * 21}|{'-' * 8}|{'-' * 9}|------")
    for role in dict.fromkeys(("build", *(r for _, r in ROLES))):
        row = rows.get(role, {})
        if not run.peaks.get(role) and not row.get("recorded"):
            continue
        sampled = run.peaks.get(role, 0)
        recorded = format_size(row["recorded"]) if row.get("recorded") else "-"
        print(f"| {role:<15} | {format_size(sampled):>18} | {recorded:>19} | {sampled / model_bytes:>6.2f} | "
              f"{row.get('seconds', 0.0):>7.1f} | {row.get('path', '')}")
    if run.returncode != 0:
        failed = [s for s in run.report.get("steps", []) if s.get("status") == "failed"]
        for step in failed:
            print(f"  failed: {step['label']}: {step.get('error')}")
        if not failed:
            print(run.stderr[-3000:])


def print_slopes(results: list[tuple[str, int, Run]]) -> None:
    import numpy as np

    by_family: dict[str, list[tuple[int, Run]]] = {}
    for label, model_bytes, run in results:
        by_family.setdefault(label.split("-")[0], []).append((model_bytes, run))
    for family, runs in by_family.items():
        if len(runs) < 2:
            continue
        print(f"\n## {family}: peak RSS against bf16 model bytes (least squares over {len(runs)} sizes)")
        print(f"| {'step':<15} | {'slope (RSS bytes per model byte)':>32} | {'intercept':>10}")
        print(f"|{'-' * 17}|{'-' * 34}|{'-' * 11}")
        for role in dict.fromkeys(("build", *(r for _, r in ROLES))):
            points = [(b, r.peaks[role]) for b, r in runs if role in r.peaks]
            if len(points) < 2:
                continue
            slope, intercept = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
            print(f"| {role:<15} | {slope:>32.2f} | {intercept / 2**20:>7.0f} MB")


def parse_size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6, "GIB": 2**30, "MIB": 2**20}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1B,0.5B", help="comma-separated, of 0.1B 0.5B 1.5B 3B")
    parser.add_argument("--families", default="qwen2,llama")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--path", choices=("auto", "whole-model", "streamed"), default="auto",
                        help="the torch passes' path (auto: what quantforge chooses)")
    parser.add_argument("--limit", default="auto",
                        help="memory limit for the biggest size's second build: auto (what its heaviest step "
                             "needs streamed, beside the build process; at least 90%% of the bf16 weights), none, "
                             "or e.g. 2.1GB")
    parser.add_argument("--only-limited", action="store_true", help="only the limited build of the biggest size")
    parser.add_argument("--root", type=Path, default=REPO / "demo" / "bench-scale")
    args = parser.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.path != "auto":
        env["QUANTFORGE_TORCH_PATH"] = args.path
    results: list[tuple[str, int, Run]] = []
    models = {f"{family}-{size}": family_checkpoint(family, size, args.root / "models")
              for family in families for size in sizes}
    for label, source in ([] if args.only_limited else models.items()):
        work = args.root / "work" / f"{label}-{args.path}"
        run = build(targets_file(work, label, source, args), work / "qf", env)
        results.append((label, checkpoint_bytes(source), run))
        print_run(label, results[-1][1], run)
    print_slopes(results)
    if args.limit != "none":
        label, source = max(models.items(), key=lambda item: checkpoint_bytes(item[1]))
        limited(label, checkpoint_bytes(source), args, env)
    return 0


def limited(label: str, model_bytes: int, args: argparse.Namespace, env: dict[str, str]) -> None:
    """Build `label` again from scratch inside a memory cgroup."""
    from quantforge.figures import format_size
    from quantforge.formats.gguf_costs import CONVERTER_BASELINE
    from quantforge.toolchains.layerwise import checkpoint_tensors, estimate_peak_bytes

    source = args.root / "models" / label
    if args.limit == "auto":
        # the heaviest step on the streamed path (the torch passes, or the converter with its largest tensor),
        # beside the build process itself, which shares the group: the bf16 weights' size when that is more
        largest = max(n for _, n in checkpoint_tensors(source).values())
        needs = max(CONVERTER_BASELINE + 8 * largest,
                    *(estimate_peak_bytes(source, shape).streamed
                      for shape in ((args.chunks, args.ctx), (args.samples, args.seq_len))))
        limit = max(int(0.9 * model_bytes), BUILD_PROCESS_BYTES + needs)
        limit = -(-limit // (50 * 10**6)) * 50 * 10**6  # up to a round 50 MB
    else:
        limit = parse_size(args.limit)
    fp32 = 2 * model_bytes
    print(f"\n## {label} under a {format_size(limit)} cgroup memory limit ({limit / model_bytes:.0%} of its bf16 "
          f"weights, {limit / fp32:.0%} of its fp32 weights)")
    work = args.root / "work" / f"{label}-limited"
    try:
        cgroup = memory_cgroup(f"quantforge-bench-{os.getpid()}", limit)
    except CgroupUnavailable as exc:
        raise SystemExit(f"cannot make a memory-limited cgroup: {exc}") from None
    try:
        run = build(targets_file(work, label, source, args), work / "qf", env, cgroup)
        print(f"cgroup v{cgroup.version}: peak usage {format_size(cgroup.peak() or 0)} (page cache included), "
              f"out-of-memory kills {cgroup.oom_kills()}")
    finally:
        cgroup.remove()
    print_run(f"{label} (limited)", model_bytes, run)


if __name__ == "__main__":
    sys.exit(main())
