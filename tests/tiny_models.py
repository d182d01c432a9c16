"""Tiny causal LMs with random weights and a real tokenizer of their family, built offline.

The tokenizers come from llama.cpp's vocab-only GGUFs (shipped in the llama-cpp-python sdist that converter
provisioning downloads anyway), turned into Hugging Face tokenizers by transformers.
"""

from __future__ import annotations

from pathlib import Path

# family -> (transformers config class, vocab GGUF, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "ggml-vocab-llama-bpe.gguf", {}),  # Llama 3 tokenizer
    "mistral": ("MistralConfig", "ggml-vocab-llama-spm.gguf", {"sliding_window": None}),  # sentencepiece
    "qwen2": ("Qwen2Config", "ggml-vocab-qwen2.gguf", {}),
    "qwen3": ("Qwen3Config", "ggml-vocab-qwen2.gguf", {"head_dim": 16}),  # Qwen3 shares Qwen2's tokenizer
}


def make_tiny_model(family: str, vocab_dir: Path, dest: Path, *, seed: int = 0, hidden: int = 64,
                    tied: bool = True) -> Path:
    """hidden=64 is the smallest that converts; GPTQModel's AWQ needs output sizes in multiples of 64, which
    hidden=128 gives the key/value projections (2 heads of 32); hidden=256 fits K-quants' 256-blocks. tied=False
    gives the model an output head of its own (GGUF output.weight) beside the embeddings."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dest / "config.json").is_file():
        return dest
    config_cls, vocab_file, extra = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(vocab_dir, gguf_file=vocab_file)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make_untrained_bpe_model(dest: Path) -> Path:
    """A tiny Llama with a BPE tokenizer trained here: llama.cpp's converter cannot know its pre-tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # a pre-tokenizer no released model uses, so its hash is unknown to the converter
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=True)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["quantforge builds verified quantized models 0123456789"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def fake_checkpoint(folder: Path, weights: tuple[int, int] = (64, 64)) -> Path:
    """Enough of a checkpoint to plan (config, one fp16 safetensors tensor of shape `weights`, a tokenizer file):
    nothing builds it."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    save_file({"w": np.zeros(weights, dtype=np.float16)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder
