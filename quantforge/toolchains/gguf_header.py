"""A fast reader for a GGUF file's header: metadata keys and tensor infos, without the tensor data.

Written by hand because gguf-py's GGUFReader materializes every element of every metadata array: on a 151k-token
vocabulary (Qwen2) it takes ~8 s per file, against ~0.1 s here. Values of arrays are skipped, not decoded; the
type enum still comes from gguf-py.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int = 0  # of its data, from GGUFHeader.data_start

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # arrays appear as ("array", element count)
    tensors: list[TensorInfo]
    data_start: int = 0  # file offset of the tensor data section

    def tensor_bytes(self, path: Path) -> dict[str, bytes]:
        """Each tensor's raw (quantized) data, read from `path` (tests compare files with it)."""
        ordered = sorted(self.tensors, key=lambda t: t.offset)
        out = {}
        with open(path, "rb") as f:
            for i, t in enumerate(ordered):
                f.seek(self.data_start + t.offset)
                end = ordered[i + 1].offset if i + 1 < len(ordered) else None
                out[t.name] = f.read(end - t.offset) if end is not None else f.read()
        return out


class CorruptGGUF(ValueError):
    """A GGUF header that does not hold together: a length or count beyond the end of the file, or a value type
    that does not exist. Says where."""


class _Reader:
    """Reads a header, bounding every length and count it reads by what is left of the file: a header declaring
    a 2^60-byte string is refused at once, not allocated."""

    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def fail(self, at: int, what: str) -> CorruptGGUF:
        return CorruptGGUF(f"{self.path.name}: corrupt GGUF header at offset {at}: {what} ({self.size} bytes in "
                           "the file)")

    def left(self) -> int:
        return self.size - self.f.tell()

    def read(self, fmt: str) -> Any:
        at, size = self.f.tell(), struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise self.fail(at, "the file ends inside the header")
        return struct.unpack(fmt, data)[0]

    def skip(self, n: int, what: str, at: int) -> None:
        """Skip `n` bytes of what the header declared at offset `at`."""
        if n > self.left():
            raise self.fail(at, f"{what} of {n} bytes runs past the end of the file")
        self.f.seek(n, 1)

    def string(self) -> str:
        at = self.f.tell()
        n = self.read("<Q")
        if n > self.left():
            raise self.fail(at, f"a string of {n} bytes runs past the end of the file")
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            at = self.f.tell()
            etype, count = self.read("<I"), self.read("<Q")
            if count > self.left():  # every element takes at least a byte
                raise self.fail(at, f"an array of {count} elements runs past the end of the file")
            if etype in _SCALARS:
                self.skip(struct.calcsize(_SCALARS[etype]) * count, "an array", at)
            elif etype == _STRING:
                for _ in range(count):
                    where = self.f.tell()
                    self.skip(self.read("<Q"), "a string", where)
            else:
                for _ in range(count):
                    self.value(etype)
            return ("array", count)
        raise self.fail(self.f.tell() - 4, f"unknown value type {vtype}")


_MAX_DIMS = 8  # ggml has 4; room for a future format, none for a garbage count


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at `path`; CorruptGGUF (a ValueError) when it is not one, or does not hold together."""
    from gguf import GGMLQuantizationType

    with open(path, "rb") as f:
        r = _Reader(f, os.fstat(f.fileno()).st_size, path)
        if f.read(4) != b"GGUF":
            raise CorruptGGUF(f"{path} is not a GGUF file")
        r.read("<I")  # version
        n_tensors, n_kv = r.read("<Q"), r.read("<Q")
        metadata = {}
        for _ in range(n_kv):  # each pass reads at least 12 bytes: a lying count ends at the end of the file
            key = r.string()
            metadata[key] = r.value(r.read("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            at = f.tell()
            n_dims = r.read("<I")
            if n_dims > _MAX_DIMS:
                raise r.fail(at, f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(r.read("<Q") for _ in range(n_dims))
            ttype = r.read("<I")
            offset = r.read("<Q")
            try:
                type_name = GGMLQuantizationType(ttype).name
            except ValueError:
                type_name = f"type{ttype}"
            tensors.append(TensorInfo(name, shape, type_name, offset))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise r.fail(0, f"general.alignment is {alignment!r}")
        data_start = -(-f.tell() // alignment) * alignment
        _check_data_fits(tensors, data_start, r.size, path)
    return GGUFHeader(metadata, tensors, data_start)


def tensor_bytes(type_name: str, elements: int) -> int:
    """What `elements` weights take in a ggml type (its blocks: gguf-py's GGML_QUANT_SIZES)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return elements // block * type_size


def _check_data_fits(tensors: list[TensorInfo], data_start: int, size: int, path: Path) -> None:
    """A file cut short (a copy or download that stopped) is refused here, not when llama.cpp fails to load it."""
    from gguf import GGMLQuantizationType

    for t in tensors:
        if t.type_name not in GGMLQuantizationType.__members__:
            continue
        end = data_start + t.offset + tensor_bytes(t.type_name, t.n_elements)
        if end > size:
            raise CorruptGGUF(f"{path.name}: truncated GGUF: tensor {t.name!r} ends at byte {end}, past the end of the "
                              f"file ({size} bytes)")
