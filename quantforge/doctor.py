"""`quantforge doctor`: what this machine offers a build, and what is missing."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from . import __version__
from .errors import ToolchainError
from .toolchains import llamacpp

_PACKAGES = ("llama-cpp-python", "torch", "transformers", "gptqmodel", "optimum", "huggingface_hub", "gguf",
             "safetensors", "sentencepiece")


def collect(llama_cpp_dir: str | None = None) -> dict[str, Any]:
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
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info()"
                            ".decode().strip())"], capture_output=True, text=True)
    info["llama.cpp system"] = probe.stdout.strip() if probe.returncode == 0 else "cannot load libllama"
    if probe.returncode != 0:
        problems.append("libllama does not load: " + (probe.stderr.strip().splitlines() or ["?"])[-1])
    try:
        import torch

        info["gpu"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else "none (CPU only: calibration works, slowly; GPTQ/AWQ of a 7B model take hours)")
    except ImportError:
        info["gpu"] = "unknown (torch missing)"
    info["problems"] = "; ".join(problems) or "none"
    return info
