"""The llama.cpp quantization types quantforge offers, shared by the schema, the CLI and the docs.

Each name maps to libllama's `llama_ftype` enum member. The lowest-bit i-quants need an importance matrix
(`imatrix: true`): llama.cpp refuses to make them without one.
"""

from __future__ import annotations

# name -> member of llama_cpp (llama.h `enum llama_ftype`)
GGUF_TYPES: dict[str, str] = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "Q3_K_L": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q3_K_S": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "IQ3_M": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "IQ3_S": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "IQ3_XS": "LLAMA_FTYPE_MOSTLY_IQ3_XS",
    "IQ3_XXS": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "IQ2_M": "LLAMA_FTYPE_MOSTLY_IQ2_M",
    "IQ2_S": "LLAMA_FTYPE_MOSTLY_IQ2_S",
    "IQ2_XS": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "IQ2_XXS": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
    "IQ1_M": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "IQ1_S": "LLAMA_FTYPE_MOSTLY_IQ1_S",
}

# types whose quantization takes no importance matrix: they get none, so their cache keys do not depend on it
IMATRIX_UNUSED = ("F32", "F16", "BF16", "Q8_0")
# llama.cpp's quantize refuses these without an importance matrix (tools/quantize/quantize.cpp)
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")

# What the converter may write as the full-precision intermediate that every type is quantized from.
# "auto" lets the converter pick the highest-fidelity 16-bit type for the source's dtype.
INTERMEDIATE_TYPES = ("auto", "f16", "bf16", "f32")

# Default quality gate: the largest relative perplexity increase over the source model on the same windows.
# Small models lose far more at low bits than 7B ones; tighten or loosen per model with
# evaluation.max_ppl_increase.
DEFAULT_MAX_PPL_INCREASE_BY_TYPE: dict[str, float] = {
    "F32": 0.002, "F16": 0.005, "BF16": 0.005,
    "Q8_0": 0.02, "Q6_K": 0.04,
    "Q5_K_M": 0.08, "Q5_K_S": 0.08, "Q5_1": 0.08, "Q5_0": 0.08,
    "Q4_K_M": 0.15, "Q4_K_S": 0.15, "Q4_1": 0.25, "Q4_0": 0.25, "IQ4_NL": 0.15, "IQ4_XS": 0.15,
    "Q3_K_L": 0.35, "Q3_K_M": 0.40, "Q3_K_S": 0.50, "Q2_K": 1.0,
    "IQ3_M": 0.35, "IQ3_S": 0.40, "IQ3_XS": 0.45, "IQ3_XXS": 0.50,
    "IQ2_M": 0.80, "IQ2_S": 1.0, "IQ2_XS": 1.2, "IQ2_XXS": 1.5, "IQ1_M": 2.5, "IQ1_S": 3.0,
}

# About how many bits each weight takes in a file of each type (llama.cpp's quantize tool lists these): what a
# nightly plan estimates an artifact's size from before it exists (steps/disk.py)
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56,
    "Q5_K_M": 5.67, "Q5_K_S": 5.52, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q4_K_M": 4.83, "Q4_K_S": 4.57, "Q4_1": 5.0, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "Q3_K_L": 4.27, "Q3_K_M": 3.89, "Q3_K_S": 3.5, "Q2_K": 3.0,
    "IQ3_M": 3.66, "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06,
    "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,
}
