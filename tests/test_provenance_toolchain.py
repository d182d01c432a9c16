"""Provenance inside GGUF files, at the toolchain level: --metadata at conversion, kv_overrides at quantization
(llama-quantize's quantize.imatrix.* keys and our own), and the importance matrix as llama.cpp's imatrix GGUF.
Real converter, real libllama, on a tiny Llama whose rows are multiples of 256 (K-quants without fallbacks)."""

from __future__ import annotations

import ctypes
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from quantforge import __version__
from quantforge.errors import BadInputError
from quantforge.toolchains import imatrix_gguf, llamacpp
from quantforge.toolchains.gguf_header import read_header

pytestmark = pytest.mark.slow

METADATA = {
    "general.name": "Tiny Llama",
    "general.quantized_by": "quantforge",
    "general.repo_url": "https://huggingface.co/acme/tiny-llama-GGUF",
    "general.license.name": "apache-2.0",
    "general.base_models": [{"name": "Tiny Llama", "organization": "Acme", "version": "v1",
                             "repo_url": "https://huggingface.co/acme/tiny-llama"}],
    "general.tags": ["quantforge", "gguf"],
}
OVERRIDES: dict[str, llamacpp.KVValue] = {
    "general.license": "apache-2.0",  # the converter's --metadata ignores it; quantization can set it
    "quantforge.version": __version__,
    "quantforge.source.revision": "0123456789abcdef0123456789abcdef01234567",
    "quantforge.eval.ppl": 12.5,
    "quantforge.gated": True,
}
TOKENS, CHUNK_SIZE = 4 * 512, 512
DATASET = "hf:wikitext/wikitext-2-raw-v1@b08601e:train"
N_LINEAR = 2 * 7  # two layers of q, k, v, o, gate, up, down (the tied output matrix is left out)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models, converter):
    """A tiny Llama converted with metadata, its importance matrix, and two Q4_K_M files quantized with that
    matrix: one with kv_overrides, one without."""
    root = tmp_path_factory.mktemp("provenance")
    source = tiny_models("llama", hidden=256)
    log = root / "build.log"
    f16 = root / "model-f16.gguf"
    llamacpp.convert(converter, source, f16, "f16", log, "tiny-llama", metadata=METADATA)
    npz = root / "imatrix.npz"
    np.savez(npz, **random_imatrix(source))
    imatrix = (npz, converter.root / "gguf-py")
    plain = root / "plain.Q4_K_M.gguf"
    plain_result = llamacpp.quantize(f16, plain, "Q4_K_M", log, imatrix=imatrix)
    tagged = root / "tagged.Q4_K_M.gguf"
    kv = {**imatrix_gguf.quantize_kv("imatrix.gguf", DATASET, TOKENS // CHUNK_SIZE), **OVERRIDES}
    tagged_result = llamacpp.quantize(f16, tagged, "Q4_K_M", log, imatrix=imatrix, kv_overrides=kv)
    return {"root": root, "log": log, "f16": f16, "npz": npz, "plain": plain, "plain_result": plain_result,
            "tagged": tagged, "tagged_result": tagged_result}


def random_imatrix(source: Path) -> dict[str, np.ndarray]:
    """Positive per-input-column values for every Linear weight, under its HF module name."""
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    matrix = {}
    with safe_open(source / "model.safetensors", "np") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if name.endswith(".weight") and len(shape) == 2 and "embed_tokens" not in name:
                matrix[name.removesuffix(".weight")] = rng.uniform(0.01, 4.0, shape[1]).astype(np.float32)
    assert len(matrix) == N_LINEAR
    return matrix


def test_convert_writes_the_metadata_file_into_the_gguf(built):
    meta = read_header(built["f16"]).metadata
    assert meta["general.name"] == "Tiny Llama"
    assert meta["general.quantized_by"] == "quantforge"
    assert meta["general.repo_url"] == "https://huggingface.co/acme/tiny-llama-GGUF"
    assert meta["general.license.name"] == "apache-2.0"
    assert meta["general.base_model.count"] == 1
    assert meta["general.base_model.0.name"] == "Tiny Llama"
    assert meta["general.base_model.0.organization"] == "Acme"
    assert meta["general.base_model.0.version"] == "v1"
    assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/acme/tiny-llama"
    assert meta["general.tags"] == ("array", 2)
    assert "general.license" not in meta
    assert "--metadata" in built["log"].read_text()
    assert not list(built["root"].glob("*.json"))  # the metadata file was scratch


def test_converter_keys_it_would_ignore_are_refused_before_converting(converter, tmp_path):
    accepted = llamacpp.converter_metadata_keys(converter)
    assert accepted is not None and {"general.quantized_by", "general.base_models", "general.name"} <= accepted
    assert "general.license" not in accepted  # Metadata.load only takes the license from the model card
    out = tmp_path / "never.gguf"
    with pytest.raises(BadInputError, match=r"general\.license"):
        llamacpp.convert(converter, tmp_path, out, "f16", tmp_path / "log", "x", metadata={"general.license": "mit"})
    assert not out.exists() and not (tmp_path / "log").exists()


def test_quantize_writes_the_overrides_and_the_imatrix_keys(built):
    meta = read_header(built["tagged"]).metadata
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # what llama-quantize writes for an importance matrix
    assert meta["quantize.imatrix.file"] == "imatrix.gguf"
    assert meta["quantize.imatrix.dataset"] == DATASET
    assert meta["quantize.imatrix.entries_count"] == N_LINEAR
    assert meta["quantize.imatrix.chunks_count"] == TOKENS // CHUNK_SIZE
    # ours, each in its own GGUF type (a float is written as float32)
    assert meta["general.license"] == "apache-2.0"
    assert meta["quantforge.version"] == __version__
    assert meta["quantforge.source.revision"] == OVERRIDES["quantforge.source.revision"]
    assert meta["quantforge.eval.ppl"] == pytest.approx(12.5)
    assert meta["quantforge.gated"] is True
    # the conversion's --metadata keys come through quantization unchanged
    for key in ("general.name", "general.quantized_by", "general.repo_url", "general.base_model.0.repo_url"):
        assert meta[key] == read_header(built["f16"]).metadata[key]
    assert built["tagged_result"]["kv_overrides"]["quantize.imatrix.entries_count"] == N_LINEAR
    assert built["tagged_result"]["imatrix"]["tensors"] == N_LINEAR
    # llama.cpp still loads and runs the file
    ran = llamacpp.load_and_generate(built["tagged"], "Hello", 2, built["log"], built["root"])
    assert len(ran["generated_ids"]) >= 1
    # the record of what was written keeps each value's type through JSON (it goes into the manifest)
    record = json.loads(json.dumps(built["tagged_result"]["kv_overrides"]))
    assert record["quantforge.gated"] is True and isinstance(record["quantforge.eval.ppl"], float)


def test_quantize_without_overrides_adds_no_keys_and_the_same_weights(built):
    plain, tagged = read_header(built["plain"]), read_header(built["tagged"])
    assert not [k for k in plain.metadata if k.startswith(("quantize.", "quantforge."))]
    assert "general.license" not in plain.metadata
    assert "kv_overrides" not in built["plain_result"]
    assert plain.metadata["general.quantized_by"] == "quantforge"  # from the conversion
    # metadata only: the quantized tensors are byte for byte the same
    assert plain.tensor_bytes(built["plain"]) == tagged.tensor_bytes(built["tagged"])


@pytest.mark.parametrize(("kv", "message"), [
    ({"quantforge.note": "x" * 128}, "127 UTF-8 bytes"),
    ({"quantforge.note": "é" * 64}, "127 UTF-8 bytes"),
    ({"quantforge.count": -1}, "uint32"),
    ({"quantforge.count": 2**32}, "uint32"),
    ({"quantforge.ratio": float("nan")}, "finite"),
    ({"quantforge.list": [1, 2]}, "list values"),
    ({"général.x": "y"}, "ASCII"),
    ({"k" * 128: "y"}, "ASCII"),
    ({"general.file_type": 2}, "written by quantization"),
])
def test_kv_overrides_that_llama_cpp_cannot_write_faithfully_are_refused(tmp_path, kv, message):
    with pytest.raises(BadInputError, match=message):
        llamacpp.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M", tmp_path / "log", kv_overrides=kv)
    assert not (tmp_path / "log").exists()  # refused before a worker started


def test_quantize_kv_cuts_strings_as_llama_quantize_does():
    kv = imatrix_gguf.quantize_kv("imatrix.gguf", "é" * 100, 3)
    assert len(kv["quantize.imatrix.dataset"].encode()) <= 127 and kv["quantize.imatrix.dataset"] == "é" * 63
    assert llamacpp.check_kv_overrides(kv) == kv
    assert imatrix_gguf.quantize_kv("m.gguf") == {"quantize.imatrix.file": "m.gguf"}


def test_imatrix_gguf_loads_in_gguf_py_in_llama_imatrix_layout(built, converter):
    out = built["root"] / "imatrix.gguf"
    result = imatrix_gguf.export(built["npz"], built["f16"], out, converter.root / "gguf-py", built["log"],
                                 tokens=TOKENS, chunk_size=CHUNK_SIZE, datasets=[DATASET])
    assert (result["entries"], result["unmapped"]) == (N_LINEAR, [])
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields == {"general.type": "imatrix", "imatrix.datasets": [DATASET],
                      "imatrix.chunk_count": TOKENS // CHUNK_SIZE, "imatrix.chunk_size": CHUNK_SIZE}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * N_LINEAR
    weights = {t.name for t in read_header(built["f16"]).tensors}
    names = sorted(n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2"))
    assert len(names) == N_LINEAR and set(names) <= weights  # one entry per weighted tensor, by its GGUF name
    assert [t.name for t in reader.tensors] == [f"{n}.{s}" for n in names for s in ("in_sum2", "counts")]
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)
    # what llama-quantize's loader computes back (sums / counts) is the matrix quantization used
    mapped = _mapped_means(built["npz"])
    for name in names:
        counts = np.asarray(tensors[f"{name}.counts"].data)
        assert counts.tolist() == [TOKENS]
        sums = np.asarray(tensors[f"{name}.in_sum2"].data)
        assert sums.shape == mapped[name].shape
        np.testing.assert_allclose(sums / counts[0], mapped[name], rtol=1e-6)
    assert read_header(built["tagged"]).metadata["quantize.imatrix.entries_count"] == len(names)
    # and ggml's own GGUF parser reads it as llama-quantize's imatrix loader does
    assert _read_with_ggml(out) == {
        "datasets": [DATASET], "chunk_count": TOKENS // CHUNK_SIZE, "chunk_size": CHUNK_SIZE,
        "tensors": {t.name: (int(t.tensor_type), int(t.n_bytes)) for t in reader.tensors}}


def _read_with_ggml(path: Path) -> dict:
    """What common_imatrix_load reads (common/imatrix-loader.cpp), through libggml-base's gguf API: the wheel
    ships no llama-quantize, but it ships the C parser the tool uses. Types are checked before each getter, which
    aborts the process on a mismatch."""
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    lib = ctypes.CDLL(str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "libggml-base.so"))

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    for name, restype, argtypes in [
        ("gguf_find_key", ctypes.c_int64, [ctypes.c_char_p]), ("gguf_get_kv_type", ctypes.c_int, [ctypes.c_int64]),
        ("gguf_get_arr_type", ctypes.c_int, [ctypes.c_int64]), ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_int64]),
        ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_int64, ctypes.c_size_t]),
        ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_int64]), ("gguf_get_n_tensors", ctypes.c_int64, []),
        ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_int64]),
        ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_int64]),
        ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_int64])]:
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = [ctypes.c_void_p, *argtypes]
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx, "ggml could not parse the file"
    try:
        uint32, string, array = 4, 8, 9  # enum gguf_type
        key = {k: lib.gguf_find_key(ctx, k.encode()) for k in ("imatrix.datasets", "imatrix.chunk_count",
                                                                 "imatrix.chunk_size")}
        assert min(key.values()) >= 0  # all three, or llama-quantize refuses the file
        assert lib.gguf_get_kv_type(ctx, key["imatrix.datasets"]) == array
        assert lib.gguf_get_arr_type(ctx, key["imatrix.datasets"]) == string
        assert lib.gguf_get_kv_type(ctx, key["imatrix.chunk_count"]) == uint32
        assert lib.gguf_get_kv_type(ctx, key["imatrix.chunk_size"]) == uint32
        n = lib.gguf_get_n_tensors(ctx)
        return {
            "datasets": [lib.gguf_get_arr_str(ctx, key["imatrix.datasets"], i).decode()
                         for i in range(lib.gguf_get_arr_n(ctx, key["imatrix.datasets"]))],
            "chunk_count": lib.gguf_get_val_u32(ctx, key["imatrix.chunk_count"]),
            "chunk_size": lib.gguf_get_val_u32(ctx, key["imatrix.chunk_size"]),
            "tensors": {lib.gguf_get_tensor_name(ctx, i).decode(): (lib.gguf_get_tensor_type(ctx, i),
                                                                    lib.gguf_get_tensor_size(ctx, i))
                        for i in range(n)},
        }
    finally:
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib.gguf_free(ctx)


def _mapped_means(npz: Path) -> dict[str, np.ndarray]:
    """The npz's vectors under llama.cpp's names for Llama's tensors, mapped by hand (an oracle independent of
    gguf-py's TensorNameMap)."""
    proj = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    out = {}
    with np.load(npz) as matrix:
        for hf_name in matrix.files:
            parts = hf_name.split(".")  # model.layers.N.self_attn.q_proj
            out[f"blk.{parts[2]}.{proj[parts[-1]]}.weight"] = matrix[hf_name]
    return out


def test_imatrix_gguf_needs_a_dataset_name(built, converter):
    with pytest.raises(BadInputError, match="dataset"):
        imatrix_gguf.export(built["npz"], built["f16"], built["root"] / "x.gguf", converter.root / "gguf-py",
                            built["log"], tokens=TOKENS, chunk_size=CHUNK_SIZE, datasets=[])

