"""The importance matrix in llama.cpp's imatrix GGUF format, the file `llama-imatrix` writes and `llama-quantize
--imatrix` reads, so a release can publish the matrix its files were weighted with.

The layout, as llama.cpp's tools/imatrix/imatrix.cpp writes it and common/imatrix-loader.cpp reads it:

    general.type        = "imatrix"
    imatrix.datasets    = [str, ...]   what the matrix was computed on (the loader needs all three keys)
    imatrix.chunk_count = u32          how many chunks (calibration windows)
    imatrix.chunk_size  = u32          tokens per chunk
    per weighted tensor NAME, in sorted order:
        NAME.in_sum2  f32 [n_in]       the sum over tokens of each input column's squared activation
        NAME.counts   f32 [1]          how many tokens that sum is over

Our matrix (calibrate's imatrix.npz) holds means under Hugging Face module names, so in_sum2 = mean * tokens
(the loader divides it back); names map to GGUF tensor names through the converter's own name map
(llamacpp_worker.imatrix_entries, exactly as quantization maps them). The file is written by gguf-py's
GGUFWriter from the converter's gguf-py, in a child process, so that gguf-py and not PyPI's is the one imported.

    python -m quantforge.toolchains.imatrix_gguf --result FILE write NPZ MODEL_GGUF OUT --gguf-py DIR
                                                 --tokens N --chunk-size N [--chunk-count N] --dataset NAME ...
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, ToolchainError

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"

# what llama-quantize records in a file quantized with an importance matrix (tools/quantize/quantize.cpp)
KEY_QUANTIZE_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_CHUNKS = "quantize.imatrix.chunks_count"
_STR_LIMIT = 127  # llama.cpp's override strings: a 128-byte buffer, NUL included


def export(npz: Path, model_gguf: Path, out_file: Path, gguf_py: Path, log_path: Path, *, tokens: int,
           chunk_size: int, datasets: Sequence[str], chunk_count: int | None = None) -> dict[str, Any]:
    """Write the importance matrix `npz` (HF module name -> mean squared input, over `tokens` tokens) as an
    imatrix GGUF at `out_file`, its names mapped through `model_gguf` (the converted model it weighs) and the
    converter's `gguf_py`. `datasets`: names of what it was computed on (at least one); `chunk_size`: tokens per
    calibration window; `chunk_count` defaults to tokens // chunk_size. Returns {"entries", "unmapped"}."""
    _check(tokens, chunk_size, datasets, chunk_count)
    from .worker import run_worker

    args = ["write", str(npz), str(model_gguf), str(out_file), "--gguf-py", str(gguf_py), "--tokens", str(tokens),
            "--chunk-size", str(chunk_size)]
    if chunk_count is not None:
        args += ["--chunk-count", str(chunk_count)]
    for name in datasets:
        args += ["--dataset", name]
    result = run_worker("quantforge.toolchains.imatrix_gguf", args, log_path,
                        out_file.with_name(out_file.name + ".result.json"))
    if not result.pop("ok", False) or not out_file.is_file():
        raise ToolchainError(f"could not write the importance matrix as GGUF: {result.get('error', 'unknown')}")
    return result


def quantize_kv(file_name: str, dataset: str | None = None, chunks: int | None = None) -> dict[str, str | int]:
    """The quantize.imatrix.* keys llama-quantize writes, for llamacpp.quantize(kv_overrides=...): the
    matrix's file name (a published name, not a local path), the dataset it was computed on and its chunk
    count. entries_count is filled in by quantization itself. Strings are cut to llama.cpp's 127 bytes, as
    llama-quantize cuts them."""
    kv: dict[str, str | int] = {KEY_QUANTIZE_FILE: _cut(file_name)}
    if dataset:
        kv[KEY_QUANTIZE_DATASET] = _cut(dataset)
    if chunks:
        kv[KEY_QUANTIZE_CHUNKS] = chunks
    return kv


def _cut(text: str) -> str:
    return text.encode()[:_STR_LIMIT].decode("utf-8", errors="ignore")  # never half a character


def _check(tokens: int, chunk_size: int, datasets: Sequence[str], chunk_count: int | None) -> None:
    if tokens <= 0 or chunk_size <= 0 or (chunk_count is not None and chunk_count < 0):
        raise BadInputError(f"an importance matrix needs tokens > 0 and chunk_size > 0 (got {tokens}, {chunk_size})")
    # gguf-py cannot write an empty array, and llama-quantize refuses a file without imatrix.datasets
    if not datasets or not all(datasets):
        raise BadInputError("an importance matrix GGUF needs the name of at least one dataset")


def write(entries: Mapping[str, np.ndarray], out_file: Path, *, tokens: int, chunk_size: int,
          datasets: Sequence[str], chunk_count: int | None = None) -> int:
    """In the child: {GGUF tensor name: mean squared input} -> the imatrix GGUF; returns the entry count.
    Uses whichever `gguf` is importable (the child puts the converter's first)."""
    import gguf

    _check(tokens, chunk_size, datasets, chunk_count)
    tmp = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch="imatrix")
    # GGUFWriter always adds general.architecture; llama-imatrix's files have none (they describe no model)
    if hasattr(writer, "remove_key"):  # older gguf-py (a user's checkout) keeps it, which is harmless
        writer.remove_key("general.architecture")
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, tokens // chunk_size if chunk_count is None else chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name in sorted(entries):  # llama-imatrix sorts its tensors for a deterministic file
        means = np.asarray(entries[name], dtype=np.float64).reshape(-1)
        # 1-D, as ggml writes a [n, 1] tensor (n_dims drops trailing 1s)
        writer.add_tensor(f"{name}.in_sum2", (means * tokens).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([tokens], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_file)  # a killed step leaves no truncated file under the real name
    return len(entries)


def _write_command(args: argparse.Namespace) -> dict[str, Any]:
    from quantforge.toolchains.llamacpp_worker import imatrix_entries

    # imports the converter's gguf-py before anything else can import PyPI's
    entries, used = imatrix_entries(args.npz, args.gguf_py, args.model)
    n = write(entries, args.output, tokens=args.tokens, chunk_size=args.chunk_size, datasets=args.dataset,
              chunk_count=args.chunk_count)
    return {"ok": True, "entries": n, "unmapped": used["unmapped"]}


def main(argv: list[str] | None = None) -> int:
    from quantforge.toolchains.worker import serve

    parser = argparse.ArgumentParser(prog="imatrix_gguf")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("npz", type=Path)
    w.add_argument("model", type=Path)
    w.add_argument("output", type=Path)
    w.add_argument("--gguf-py", type=Path, required=True)
    w.add_argument("--tokens", type=int, required=True)
    w.add_argument("--chunk-size", type=int, required=True)
    w.add_argument("--chunk-count", type=int)
    w.add_argument("--dataset", action="append", required=True)
    return serve(parser, {"write": _write_command}, argv)


if __name__ == "__main__":
    sys.exit(main())
