"""Split a GGUF into llama.cpp's split format (what `llama-gguf-split --split-max-size` writes): shards named
`<stem>-00001-of-0000N.gguf`, all metadata in the first, `split.*` keys in each; llama.cpp, Ollama and
LM Studio load the set from its first shard. Done with gguf-py's writer, since llama-cpp-python ships no
gguf-split binary."""

from __future__ import annotations

from pathlib import Path

from ..errors import ToolchainError


def split_gguf(src: Path, dest_dir: Path, max_bytes: int) -> list[Path]:
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(src))
    # the writer's limit counts tensor bytes only: leave room for the metadata (all of it sits in shard 1,
    # a 150k-token vocabulary is MBs) and the alignment padding, so no shard exceeds max_bytes
    budget = max_bytes - reader.data_offset - reader.alignment * len(reader.tensors)
    too_big = [t.name for t in reader.tensors if t.data.nbytes > budget]
    if budget <= 0 or too_big:
        raise ToolchainError(f"{src.name}: cannot split into files of {max_bytes} bytes: "
                             + (f"tensor {too_big[0]} alone is larger" if too_big else "the metadata alone is larger"))
    arch_field = reader.fields["general.architecture"]
    writer = GGUFWriter(None, arch_field.contents(), split_max_size=budget, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith(("GGUF.", "split.")):
            continue  # the writer adds these itself
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    target = dest_dir / src.name
    shards = writer.format_shard_names(target)
    writer.write_header_to_file(target)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return shards

