"""`quantforge doctor`: what this machine offers a build, which parts will use a GPU, and what is missing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec
from typing import Any

from . import __version__
from .errors import ToolchainError
from .figures import format_size
from .pipeline import KEY_TOOLS
from .toolchains import llamacpp
from .toolchains.device import nvidia_driver_present
from .toolchains.hub_protocol import upload_protocol
from .toolchains.memory import host_memory

# and every format's key tools (pipeline.KEY_TOOLS: llama-cpp-python, GPTQModel, compressed-tensors, mlx-lm, …)
_PACKAGES = tuple(dict.fromkeys(("llama-cpp-python", "torch", "transformers", *KEY_TOOLS, "optimum",
                                 "huggingface_hub", "hf_xet", "gguf", "safetensors", "sentencepiece", "psutil",
                                 "matplotlib")))
# libllama in its own process: a broken build must not take doctor down with it
_LIBLLAMA_PROBE = ("import json, llama_cpp; print(json.dumps({'system': llama_cpp.llama_print_system_info().decode()"
                   ".strip(), 'gpu_offload': bool(llama_cpp.llama_supports_gpu_offload())}))")


def collect(llama_cpp_dir: str | None = None, *, require_gpu: bool = False) -> dict[str, Any]:
    """What `doctor` prints. `require_gpu`: a GPU leg's check; torch without a CUDA device, or a libllama built
    without GPU offload, is then a problem (and `gpu required` says which)."""
    problems: list[str] = []
    info: dict[str, Any] = {"quantforge": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "missing"
            problems.append(f"{name} is not installed")
    try:
        info["converter"] = llamacpp.converter_version(llama_cpp_dir)
        checkout = llamacpp.user_checkout(llama_cpp_dir)
        cached = llamacpp.cache_root() / f"llama.cpp-{info['llama-cpp-python']}"
        info["converter_path"] = str(checkout or cached) + ("" if checkout or (cached / ".complete").exists()
                                                            else " (downloaded on first build)")
    except ToolchainError as exc:
        problems.append(str(exc))
    probe = subprocess.run([sys.executable, "-c", _LIBLLAMA_PROBE], capture_output=True, text=True)
    libllama: dict[str, Any] = {}
    if probe.returncode == 0:
        libllama = json.loads(probe.stdout.strip().splitlines()[-1])
        info["llama.cpp system"] = libllama["system"]
    else:
        info["llama.cpp system"] = "cannot load libllama"
        problems.append("libllama does not load: " + (probe.stderr.strip().splitlines() or ["?"])[-1])
    memory = host_memory()
    info["memory"] = f"{format_size(memory.total)} RAM, {memory.describe()}"
    info.update(gpu_report(libllama.get("gpu_offload")))
    info["hub uploads"] = upload_protocol()
    if require_gpu:
        failures = gpu_failures(libllama.get("gpu_offload"))
        info["gpu required"] = "; ".join(failures) or "ok"
        problems = failures + problems
    info["problems"] = "; ".join(problems) or "none"
    return info


def gpu_failures(libllama_offload: bool | None) -> list[str]:
    """Why a build here would not use the GPU: torch sees no CUDA device, or libllama cannot offload (None: it
    does not load at all, which collect() reports already)."""
    failures = []
    try:
        import torch
    except ImportError:
        failures.append("torch is not installed")
    else:
        if not torch.cuda.is_available():
            cause = (f"an NVIDIA driver is loaded, so torch {torch.__version__} is a CPU build: install PyPI's "
                     "default (CUDA) torch wheel" if nvidia_driver_present() else
                     "no NVIDIA driver is loaded: is this a GPU machine?")
            failures.append(f"torch {torch.__version__} sees no CUDA device ({cause})")
    if libllama_offload is False:
        failures.append("llama-cpp-python was built without GPU offload: rebuild it with "
                        "CMAKE_ARGS=\"-DGGML_CUDA=on\" from a pip cache that holds no CPU build of it "
                        "(its own PIP_CACHE_DIR, or --no-cache-dir)")
    return failures


def gpu_report(libllama_offload: bool | None) -> dict[str, str]:
    """Which parts of a build will use the GPU, and what is missing for the others."""
    try:
        import torch
    except ImportError:
        return {"gpu": "unknown (torch missing)"}
    driver = nvidia_driver_present()
    if not torch.cuda.is_available():
        out = {"gpu": "none: every step runs on the CPU (GPTQ/AWQ of a 7B model take hours; the torch reference "
                      "and importance matrix stream big models layer by layer)"}
        if driver:  # an NVIDIA driver but a torch that cannot use it: the usual mistake on a GPU box
            out["gpu missing"] = (f"an NVIDIA driver is loaded but torch {torch.__version__} has no CUDA "
                                  "(install the CUDA torch wheel: docs/big-models.md)")
        return out
    free, total = torch.cuda.mem_get_info(0)
    uses = ["torch reference and importance matrix (bf16)"]
    missing = []
    if libllama_offload:
        uses.append("GGUF verification and evaluation (all layers offloaded)")
    else:
        missing.append("llama-cpp-python built without GPU offload (reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\")")
    if find_spec("gptqmodel") is None:
        missing.append("gptqmodel is not installed")
    else:
        nvcc = _nvcc()
        uses.append("GPTQ/AWQ calibration (GPTQModel)")
        if nvcc is None or find_spec("ninja") is None:
            missing.append("GPTQModel compiles its CUDA kernels (Marlin, ExLlama) on first use and needs nvcc and "
                           "ninja: install the CUDA toolkit (CUDA_HOME) and ninja, or checkpoints load on slower "
                           "torch kernels")
    return {"gpu": f"{torch.cuda.get_device_name(0)} ({format_size(free)} free of {format_size(total)}; torch "
                   f"{torch.__version__}, CUDA {torch.version.cuda})",
            "gpu used by": "; ".join(uses) + "; GGUF conversion and quantization run on the CPU",
            "gpu missing": "; ".join(missing) or "nothing"}


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")
