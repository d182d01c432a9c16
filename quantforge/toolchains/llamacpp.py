"""Adapter to llama.cpp: its reference converter (convert_hf_to_gguf.py) and libllama via llama-cpp-python.

The installed llama-cpp-python wheel has no converter, so we provision the one from the *same* version's sdist
(converter and quantizer in lockstep), cached per version. A user's own llama.cpp checkout can be used instead
(`--llama-cpp DIR` or QUANTFORGE_LLAMA_CPP_DIR); its git commit then becomes the converter's version.

libllama work (quantize, load-and-generate) runs in a child process (`llamacpp_worker`): its C-level log goes
to the step's log file, and a crash in native code fails one step instead of the build.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError, ConversionError, ToolchainError, VerificationError
from .lifeline import child_options
from .pins import tool_version

PACKAGE = "llama-cpp-python"
_CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/", "LICENSE")


def llama_cpp_version() -> str:
    # installed, or pinned by the constraints file a nightly's legs install with (a plan job has no tools)
    return tool_version(PACKAGE)


def cache_root() -> Path:
    base = os.environ.get("QUANTFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantforge")
    return Path(base)


def user_checkout(explicit: str | None = None) -> Path | None:
    value = explicit or os.environ.get("QUANTFORGE_LLAMA_CPP_DIR")
    return Path(value).expanduser().resolve() if value else None


@dataclass(frozen=True)
class Converter:
    root: Path  # a folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/
    version: str

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def vocab_dir(self) -> Path:
        """llama.cpp's vocab-only GGUFs and tokenizer test vectors (used by tests and fixtures)."""
        return self.root / "models"


def converter_version(explicit_dir: str | None = None) -> str:
    """The converter's identity for cache keys, without provisioning it."""
    checkout = user_checkout(explicit_dir)
    if checkout is None:
        return f"{PACKAGE}=={llama_cpp_version()}"
    return f"checkout:{_checkout_revision(checkout)}"


def _checkout_revision(checkout: Path) -> str:
    script = checkout / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ToolchainError(f"{checkout} is not a llama.cpp checkout (no convert_hf_to_gguf.py)")
    try:
        sha = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--", "convert_hf_to_gguf.py",
                                "conversion", "gguf-py"], capture_output=True, text=True, check=True).stdout
        if not dirty:
            return sha
    except (OSError, subprocess.CalledProcessError):
        pass
    # not a git checkout, or local edits: identify by the converter's own files
    h = hashlib.sha256()
    for path in sorted([script, *checkout.glob("conversion/*.py"), *checkout.glob("gguf-py/gguf/*.py")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return f"files-{h.hexdigest()[:16]}"


def provision_converter(explicit_dir: str | None = None) -> Converter:
    """The converter to use: the user's checkout, or the cached one for the installed llama-cpp-python."""
    checkout = user_checkout(explicit_dir)
    if checkout is not None:
        return Converter(checkout, converter_version(explicit_dir))
    version = llama_cpp_version()
    target = cache_root() / f"llama.cpp-{version}"
    if (target / ".complete").is_file():
        return Converter(target, converter_version())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".provision-") as tmp:
        sdist = _download_sdist(version, Path(tmp))
        staged = Path(tmp) / "llama.cpp"
        _extract_converter(sdist, staged)
        (staged / ".complete").write_text(f"{PACKAGE}=={version}\n")
        try:
            os.replace(staged, target)
        except OSError:
            if not (target / ".complete").is_file():  # a concurrent provisioner won the race otherwise
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staged, target)
    return Converter(target, converter_version())


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--quiet", "-d", str(into), f"{PACKAGE}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, **child_options())
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise ToolchainError(f"could not download the {PACKAGE} {version} source to get llama.cpp's converter: "
                             f"{proc.stderr.strip()[-500:]}; or point --llama-cpp at a llama.cpp checkout")
    return found[0]


def _extract_converter(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        prefix = None
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 3)
            if len(parts) >= 4 and parts[1:3] == ["vendor", "llama.cpp"]:
                prefix = "/".join(parts[:3]) + "/"
                rel = parts[3]
                if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in _CONVERTER_MEMBERS):
                    member.name = rel
                    members.append(member)
        if prefix is None or not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise ToolchainError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(dest, members=members, filter="data")


# ---------------------------------------------------------------------------------------------- conversion

_UNKNOWN_PRE = re.compile(r"BPE pre-tokenizer was not recognized")
_CHKHSH = re.compile(r"chkhsh:\s*([0-9a-f]{64})")
_UNSUPPORTED_ARCH = re.compile(r"Model (\S+) is not supported|Architecture '([^']+)' not supported")


def convert(converter: Converter, source_dir: Path, out_file: Path, outtype: str, log_path: Path,
            model_name: str, metadata: Mapping[str, Any] | None = None) -> None:
    """HF checkpoint -> full-precision GGUF with llama.cpp's reference converter.
    `metadata`: authorship and provenance keys handed to the converter as its `--metadata` file (gguf-py's
    Metadata override: "general.name", "general.quantized_by", "general.repo_url", "general.license.name",
    "general.base_models": [{"name", "organization", "version", "repo_url", ...}], "general.tags": [...], ...).
    They win over what the converter guesses from the checkpoint and its model card, and quantization copies
    them into every quantized file. Keys this converter would silently ignore are refused (BadInputError)."""
    cmd = [sys.executable, str(converter.script), str(source_dir), "--outfile", str(out_file), "--outtype", outtype]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not the PyPI one
    # the --metadata file lives only as long as the converter runs; its content goes to the log instead
    with tempfile.TemporaryDirectory(prefix="quantforge-convert-") as scratch:
        if metadata is not None:
            metadata_file = Path(scratch) / "metadata.json"
            metadata_file.write_text(json.dumps(_checked_metadata(converter, metadata), ensure_ascii=False))
            cmd += ["--metadata", str(metadata_file)]
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            if metadata is not None:
                log.write(f"# --metadata: {json.dumps(metadata, ensure_ascii=False)}\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=converter.root, env=env,
                                  **child_options())
    if proc.returncode == 0 and out_file.is_file():
        return
    raise _conversion_error(log_path.read_text(encoding="utf-8", errors="replace"), model_name)


_OVERRIDE_GET = re.compile(r"metadata_override\.get\(\s*(?:Keys\.General\.(\w+)|\"([^\"]+)\")")
_GENERAL_CONST = re.compile(r"^\s+(\w+)\s*=\s*\"(general\.[^\"]+)\"", re.MULTILINE)


def converter_metadata_keys(converter: Converter) -> frozenset[str] | None:
    """The `--metadata` keys this converter reads, from its gguf-py's source (Metadata.load looks up a fixed
    list and ignores every other key, e.g. "general.license", which it only takes from the model card).
    None when the source no longer has the expected shape: then nothing is checked."""
    gguf_dir = converter.root / "gguf-py" / "gguf"
    try:
        loader = (gguf_dir / "metadata.py").read_text(encoding="utf-8")
        constants = dict(_GENERAL_CONST.findall((gguf_dir / "constants.py").read_text(encoding="utf-8")))
    except OSError:
        return None
    keys = set()
    for const, literal in _OVERRIDE_GET.findall(loader):
        key = literal or constants.get(const)
        if key is None:
            return None
        keys.add(key)
    return frozenset(keys) or None


def _checked_metadata(converter: Converter, metadata: Mapping[str, Any]) -> dict[str, Any]:
    accepted = converter_metadata_keys(converter)
    ignored = sorted(k for k in metadata if accepted is not None and k not in accepted)
    if ignored:
        raise BadInputError(f"llama.cpp's converter ignores these --metadata keys: {', '.join(ignored)} (it reads "
                            f"{', '.join(sorted(accepted or ()))}); set them at quantization with kv_overrides")
    return dict(metadata)


def _conversion_error(log: str, model_name: str) -> ConversionError:
    if _UNKNOWN_PRE.search(log):
        h = _CHKHSH.search(log)
        return ConversionError(
            f"{model_name}: llama.cpp's converter does not recognize this tokenizer's BPE pre-tokenizer"
            + (f" (chkhsh {h.group(1)[:16]}…)" if h else ""),
            hint="the tokenizer is not in convert_hf_to_gguf_update.py; use a llama.cpp checkout that knows it "
                 "(--llama-cpp DIR), or check that tokenizer.json matches the base model's",
        )
    arch = _UNSUPPORTED_ARCH.search(log)
    if arch:
        name = arch.group(1) or arch.group(2)
        return ConversionError(f"{model_name}: llama.cpp's converter does not support architecture {name}",
                               hint="a newer llama.cpp may (--llama-cpp DIR pointing at a recent checkout)")
    tail = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return ConversionError(f"{model_name}: conversion to GGUF failed: {tail[0][:300]}")


# ---------------------------------------------------------------------------------------------- libllama

_FALLBACK = re.compile(
    r"warning:\s+(?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s+(?:\(WARNING: [^)]*\)\s+)?-> falling back to\s+(?P<used>\S+)")


def _run_worker(args: list[str], log_path: Path, result_file: Path, served: bool = False) -> dict[str, Any]:
    from .worker import run_worker

    return run_worker("quantforge.toolchains.llamacpp_worker", args, log_path, result_file, served=served)


KVValue = str | int | float | bool

# keys quantization itself writes or needs: an override would silently corrupt the output file
_RESERVED_KEYS = frozenset({"general.architecture", "general.file_type", "general.quantization_version",
                            "general.alignment"})
_KV_BUFFER = 128  # llama_model_kv_override's key[128] and val_str[128], NUL included


def check_kv_overrides(kv_overrides: Mapping[str, KVValue]) -> dict[str, KVValue]:
    """What llama_model_quantize can write faithfully, refused up front otherwise (BadInputError): ASCII keys and
    UTF-8 strings of at most 127 bytes, ints in 0..2**32-1 (written as uint32 of |value|), finite floats
    (written as float32), bools."""
    checked: dict[str, KVValue] = {}
    for key, value in kv_overrides.items():
        if not isinstance(key, str) or not key or not key.isascii() or "\0" in key or len(key) >= _KV_BUFFER:
            raise BadInputError(f"GGUF key {key!r}: must be non-empty ASCII of at most {_KV_BUFFER - 1} characters")
        if key in _RESERVED_KEYS or key.startswith("split."):
            raise BadInputError(f"GGUF key {key!r} is written by quantization itself and cannot be overridden")
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            if not 0 <= value < 2**32:
                raise BadInputError(f"{key}: {value} does not fit the uint32 that llama.cpp writes int overrides as")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise BadInputError(f"{key}: {value} is not a finite number")
        elif isinstance(value, str):
            if "\0" in value or len(value.encode()) >= _KV_BUFFER:
                raise BadInputError(f"{key}: llama.cpp's override strings hold at most {_KV_BUFFER - 1} UTF-8 bytes "
                                    f"(this one has {len(value.encode())})")
        else:
            raise BadInputError(f"{key}: {type(value).__name__} values cannot be written (str, int, float or bool)")
        checked[key] = value
    return checked


@dataclass(frozen=True)
class TensorTypes:
    """Tensor types that override a file type's mix, as llama-quantize's --output-tensor-type,
    --token-embedding-type and --tensor-type PATTERN=TYPE set them (ggml type names; patterns are searched in
    each tensor's name, the first that matches wins)."""

    output: str | None = None
    embeddings: str | None = None
    patterns: tuple[tuple[str, str], ...] = ()

    def worker_args(self) -> list[str]:
        args = ["--output-tensor-type", self.output] if self.output else []
        args += ["--token-embedding-type", self.embeddings] if self.embeddings else []
        for pattern, qtype in self.patterns:
            args.append(f"--tensor-type={pattern}={qtype}")  # one argument: a pattern may start with '-'
        return args


def quantize(in_file: Path, out_file: Path, gguf_type: str, log_path: Path, threads: int | None = None,
             imatrix: tuple[Path, Path] | None = None,
             kv_overrides: Mapping[str, KVValue] | None = None, tensor_types: TensorTypes | None = None) -> dict:
    """Quantize with libllama's llama_model_quantize; returns what llama.cpp did (fallbacks included).
    `imatrix`: (an importance matrix under HF module names, the converter's gguf-py that maps them).
    `kv_overrides`: metadata to add to (or replace in) the output file, as llama-quantize's --override-kv does
    (see check_kv_overrides); with an imatrix, "quantize.imatrix.entries_count" is set to the number of
    tensors it weighted (imatrix_gguf.quantize_kv gives llama-quantize's other quantize.imatrix.* keys).
    The result then has "kv_overrides": what was written. `tensor_types`: tensors to store in other types than
    `gguf_type` gives them (where a pattern's type does not fit a tensor's rows, llama.cpp falls back, and the
    result lists it among "fallbacks")."""
    start = log_path.stat().st_size if log_path.exists() else 0
    args = ["quantize", str(in_file), str(out_file), gguf_type, "--threads", str(threads or 0)]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix[0]), "--gguf-py", str(imatrix[1])]
    if kv_overrides is not None:
        args += ["--kv-overrides", json.dumps(check_kv_overrides(kv_overrides), ensure_ascii=False)]
    if tensor_types is not None:
        args += tensor_types.worker_args()
    # one worker serves a build's quantizations: libllama frees all it allocates when llama_model_quantize returns,
    # and a process start is a fifth of quantizing a small model (0.19 of 0.93 s per type, SmolLM2-135M, 2 cores)
    result = _run_worker(args, log_path, out_file.with_suffix(".result.json"), served=True)
    if not result.get("ok") or not out_file.is_file():
        raise ToolchainError(f"llama.cpp quantization to {gguf_type} failed: {result.get('error', 'unknown')}")
    with open(log_path, encoding="utf-8", errors="replace") as log:
        log.seek(start)
        text = log.read()
    result["fallbacks"] = [m.groupdict() for m in _FALLBACK.finditer(text)]
    return result


def load_and_generate(gguf_file: Path, prompt: str, n_tokens: int, log_path: Path, scratch: Path,
                      threads: int | None = None) -> dict[str, Any]:
    """Check by the real consumer: llama.cpp loads the file and greedily generates up to `n_tokens` tokens, EOS
    not counted (VerificationError for non-finite logits)."""
    result = _run_worker(["generate", str(gguf_file), "--prompt", prompt, "--tokens", str(n_tokens),
                          "--threads", str(threads or 0)], log_path, scratch / "generate.result.json")
    if not result.get("ok"):
        raise VerificationError(f"llama.cpp could not run {gguf_file.name}: {result.get('error', 'unknown')}")
    return result


def evaluate(gguf_file: Path, windows: Path, reference: Path, sample: Path | None, log_path: Path,
             scratch: Path, threads: int | None = None) -> dict[str, Any]:
    """Perplexity, KL divergence and top-1 agreement of a GGUF in the llama.cpp runtime, on the given windows."""
    args = ["evaluate", str(gguf_file), "--windows", str(windows), "--reference", str(reference),
            "--threads", str(threads or 0)]
    if sample is not None:
        args += ["--sample", str(sample)]
    result = _run_worker(args, log_path, scratch / "evaluate.result.json")
    if not result.pop("ok", False):
        raise VerificationError(f"llama.cpp could not evaluate {gguf_file.name}: {result.get('error', 'unknown')}")
    return result


def probe(gguf_file: Path, windows: Path, log_path: Path, scratch: Path, threads: int | None = None, *,
          reference: Path | None = None, write_reference: Path | None = None) -> dict[str, Any]:
    """A search's measurement, by a served worker (a search makes dozens): the mean KL divergence of `gguf_file`
    from `reference` on `windows`, unrounded; or, with `write_reference`, that file's own distribution saved."""
    args = ["probe", str(gguf_file), "--windows", str(windows), "--threads", str(threads or 0)]
    args += ["--write-reference", str(write_reference)] if write_reference else ["--reference", str(reference)]
    result = _run_worker(args, log_path, scratch / "probe.result.json", served=True)
    if not result.pop("ok", False):
        raise VerificationError(f"llama.cpp could not evaluate {gguf_file.name}: {result.get('error', 'unknown')}")
    return result


# ---------------------------------------------------------------------------------------------- reading GGUF

def describe_gguf(path: Path) -> dict[str, Any]:
    """Per-tensor types and the metadata a card needs, read from the header (no libllama)."""
    from .gguf_header import read_header

    header = read_header(path)
    tensor_types = {t.name: t.type_name for t in header.tensors}
    counts: dict[str, int] = {}
    for name in tensor_types.values():
        counts[name] = counts.get(name, 0) + 1
    n_params = sum(t.n_elements for t in header.tensors)
    meta = header.metadata
    return {
        "architecture": meta.get("general.architecture"),
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
        "tokenizer_model": meta.get("tokenizer.ggml.model"),
        "has_chat_template": "tokenizer.chat_template" in meta,
        "n_params": n_params,
        "tensor_type_counts": dict(sorted(counts.items())),
        "tensor_types": tensor_types,
        "bits_per_weight": round(path.stat().st_size * 8 / n_params, 3) if n_params else None,
    }
