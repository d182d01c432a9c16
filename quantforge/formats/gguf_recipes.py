"""GGUF variants: a stock llama.cpp type with some tensors stored in other types, as llama-quantize's
`--output-tensor-type`, `--token-embedding-type` and `--tensor-type PATTERN=TYPE` set them.

    formats:
      gguf:
        types: [Q4_K_M, Q8_0, Q4_K_L, Q4_K_XL]     # stock types, builtin variants, declared variants
        variants:
          Q4_K_XL: {base: Q4_K_M, output: Q8_0, embeddings: Q8_0, tensors: {'blk\\.[0-3]\\.ffn_down': Q6_K}}

A recipe is a `Recipe` value. The planner takes it from targets.yaml (declared, or a builtin `_L`/`_XL` name); a
searched one would come from a step's data instead; from the quantize step on, only the value matters:
    gguf.quantize   checks it against the converted model's tensors (check_tensors: a pattern that matches no
                    tensor is an error naming it), passes it to libllama, records what each rule set (applied),
                    and writes it into the file (metadata: quantforge.recipe and quantforge.recipe.tensor_type.N)
    card            the llama-quantize command line that reproduces the file (command)
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError, ToolchainError
from ..toolchains.gguf_header import read_header
from ..toolchains.llamacpp import TensorTypes

# The ggml tensor types a rule may name (llama-quantize's parse_ggml_type takes these names, any case)
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL",
                "IQ4_XS", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
# tensor types llama.cpp refuses to make without an importance matrix (llama-quant.cpp tensor_requires_imatrix;
# not for the output and embeddings)
TENSOR_TYPES_NEEDING_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
UNQUANTIZED = ("F32", "F16", "BF16")

# A variant is reached by a tag, `hf.co/REPO:Q4_K_L`: the Hub (huggingface.js parseGGUFQuantLabel) reads a file's
# label as a ggml tensor type and an optional `_LETTERS`; a name of another shape would be read as something else
# (Q4_K_M_2 as Q4_K_M, the stock file)
_GGML_NAMES = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "BF16")
TAG_RE = re.compile(f"(?:{'|'.join(_GGML_NAMES)})(?:_[A-Z]+)?")
MAX_NAME = 24  # with the base type and the output/embedding types, quantforge.recipe fits libllama's 127 bytes
KV_MAX = 127  # libllama's string overrides (llama_model_kv_override.val_str) hold 127 bytes and a NUL
RECIPE_KEY = "quantforge.recipe"
PATTERN_KEY = "quantforge.recipe.tensor_type.{}"
OUTPUT, EMBEDDINGS = "output.weight", "token_embd.weight"  # llama.cpp's names (llama-quant.cpp)


@dataclass(frozen=True)
class Recipe:
    """A variant: a stock file type (`base`) with the output, the token embeddings and the tensors whose names
    match a pattern (re.search, first match wins, as in llama.cpp) stored in the types given."""

    name: str
    base: str
    output: str | None = None
    embeddings: str | None = None
    tensors: tuple[tuple[str, str], ...] = ()  # (pattern, type), in order

    def to_params(self) -> dict[str, Any]:
        """As a quantize step's parameter (part of its key): the patterns as a list, since their order matters."""
        out: dict[str, Any] = {"name": self.name, "base": self.base}
        out.update({k: v for k, v in (("output", self.output), ("embeddings", self.embeddings)) if v})
        if self.tensors:
            out["tensors"] = [list(rule) for rule in self.tensors]
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Recipe:
        return cls(params["name"], params["base"], params.get("output"), params.get("embeddings"),
                   tuple((p, t) for p, t in params.get("tensors", ())))

    def tensor_types(self) -> TensorTypes:
        return TensorTypes(self.output, self.embeddings, self.tensors)

    def types(self) -> set[str]:
        return {t for t in (self.output, self.embeddings, *(t for _, t in self.tensors)) if t}

    def metadata(self) -> dict[str, str]:
        """The GGUF keys that say how the file was made: `quantforge.recipe` (JSON: name, base, output and
        embedding types, the number of patterns) and one `quantforge.recipe.tensor_type.N` per pattern, written as
        llama-quantize's --tensor-type takes it (libllama's overrides hold 127 bytes: one JSON would not fit)."""
        head = {"name": self.name, "base": self.base, "output": self.output, "embeddings": self.embeddings,
                "tensor_types": len(self.tensors)}
        kv = {RECIPE_KEY: json.dumps({k: v for k, v in head.items() if v is not None}, separators=(",", ":"))}
        kv.update({PATTERN_KEY.format(i): f"{p}={t}" for i, (p, t) in enumerate(self.tensors)})
        return kv

    def describe(self) -> str:
        """One line for a card's table: what differs from the base type."""
        parts = [f"output {self.output}"] if self.output else []
        parts += [f"embeddings {self.embeddings}"] if self.embeddings else []
        parts += [f"{len(self.tensors)} pattern{'s' if len(self.tensors) > 1 else ''}"] if self.tensors else []
        return f"{self.base} + " + ", ".join(parts)

    def command(self, source: str, out: str, imatrix: str | None = None) -> str:
        """The llama-quantize command line that makes the same file from the same full-precision GGUF."""
        args = ["llama-quantize"] + (["--imatrix", imatrix] if imatrix else [])
        args += ["--output-tensor-type", self.output.lower()] if self.output else []
        args += ["--token-embedding-type", self.embeddings.lower()] if self.embeddings else []
        for pattern, qtype in self.tensors:
            args += ["--tensor-type", f"{pattern}={qtype.lower()}"]
        return shlex.join([*args, source, out, self.base])


# bartowski's names: a stock type with the embeddings and the output at Q8_0 (Q3_K_L exists, so Q3_K_XL)
BUILTIN_VARIANTS: dict[str, Recipe] = {name: Recipe(name, base, "Q8_0", "Q8_0") for name, base in (
    ("Q2_K_L", "Q2_K"), ("Q3_K_XL", "Q3_K_L"), ("Q4_K_L", "Q4_K_M"), ("Q5_K_L", "Q5_K_M"), ("Q6_K_L", "Q6_K"))}


def needs_imatrix(recipe: Recipe) -> list[str]:
    return sorted(t for _, t in recipe.tensors if t in TENSOR_TYPES_NEEDING_IMATRIX)


# ------------------------------------------------------------------------------------- the model's tensors

class RecipeMismatch(BadInputError):
    """A recipe does not fit the model it is applied to: a pattern that matches none of its tensors, a type its
    rows cannot hold."""


@dataclass(frozen=True)
class Tensor:
    name: str
    columns: int  # ne[0], the row length a block type must divide


def quantizable(name: str, dims: int) -> bool:
    """The tensors llama.cpp quantizes (llama-quant.cpp tensor_allows_quantization, the parts that apply to
    decoder models): 2D and 3D weights, not norms or expert gates."""
    return dims >= 2 and name.endswith("weight") and "_norm.weight" not in name and \
        "ffn_gate_inp.weight" not in name


def quantized_tensors(path: Path) -> list[Tensor]:
    """The tensors of a GGUF file that llama.cpp would quantize, from its header."""
    return [Tensor(t.name, t.shape[0]) for t in read_header(path).tensors if quantizable(t.name, len(t.shape))]


def check_tensors(recipe: Recipe, tensors: list[Tensor], where: str) -> None:
    """Refuse, before quantizing, a rule that would decide no tensor of this model (a pattern that matches none,
    or only tensors an earlier pattern already set) and an output or embedding type whose blocks do not divide
    the tensor's rows (llama.cpp falls back for patterns, not for those two). `where`: the model and the key, for
    the message."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    names = [t.name for t in tensors]
    # the output and embedding types come first in llama.cpp: a pattern does not decide those tensors then
    claimed = {name: key for key, name, qtype in (("output", OUTPUT, recipe.output),
                                                  ("embeddings", EMBEDDINGS, recipe.embeddings)) if qtype}
    for pattern, _ in recipe.tensors:
        matched = [n for n in names if re.search(pattern, n)]
        fresh = [n for n in matched if n not in claimed]
        if not matched:
            raise RecipeMismatch(f"{where}.tensors: {pattern!r} matches no tensor llama.cpp quantizes in this model "
                                 f"({_examples(names)})")
        if not fresh:
            raise RecipeMismatch(f"{where}.tensors: {pattern!r} matches only tensors that {claimed[matched[0]]!r} "
                                 "already sets (the output and embedding types come first, then the first pattern "
                                 "that matches)")
        claimed.update({n: pattern for n in fresh})
    columns = {t.name: t.columns for t in tensors}
    for key, name, qtype in (("output", OUTPUT, recipe.output), ("embeddings", EMBEDDINGS, recipe.embeddings)):
        if qtype is None or name not in columns:
            continue
        block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
        if columns[name] % block:
            raise RecipeMismatch(f"{where}.{key}: {qtype} stores rows in blocks of {block}, and {name} has rows of "
                                 f"{columns[name]}: use a type with blocks of 32, such as Q8_0 or Q4_0")


def _examples(names: list[str]) -> str:
    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))})
    first = sorted({n for n in names if not n.startswith("blk.") or n.startswith("blk.0.")})
    return (f"it has {', '.join(first[:8])}{', …' if len(first) > 8 else ''}"
            + (f"; layers blk.{layers[0]}–blk.{layers[-1]}" if layers else ""))


def applied(recipe: Recipe, tensors: list[Tensor], tensor_types: Mapping[str, str],
            fallbacks: list[dict[str, str]]) -> dict[str, Any]:
    """What each rule of `recipe` set in the file (tensor -> type read back from it) among the `tensors` llama.cpp
    quantizes, with its precedence: the embedding type, the output type, the first pattern that matches (and, for
    tied embeddings, the output type on token_embd when nothing else set it). Raises ToolchainError when a tensor
    a rule decides holds another type and llama.cpp recorded no fallback for it."""
    names = [t.name for t in tensors]
    fell_back = {f["tensor"]: f["used"].upper() for f in fallbacks}
    rules: list[dict[str, Any]] = []
    claimed: set[str] = set()
    wrong = []

    def rule(what: str, qtype: str | None, decided: list[str]) -> None:
        if qtype is None:
            return
        got = {n: tensor_types[n] for n in decided}
        wrong.extend(f"{n} is {t}, not {qtype}" for n, t in got.items() if t != qtype and fell_back.get(n) != t)
        rules.append({"rule": what, "type": qtype, "tensors": got})
        claimed.update(decided)

    rule("embeddings", recipe.embeddings, [n for n in names if n == EMBEDDINGS])
    patterns = [(p, t, [n for n in names if re.search(p, n)]) for p, t in recipe.tensors]
    tied = OUTPUT not in names and not any(EMBEDDINGS in matched for _, _, matched in patterns)
    rule("output", recipe.output, [n for n in names if n == OUTPUT or (tied and n == EMBEDDINGS and n not in claimed)])
    for pattern, qtype, matched in patterns:
        rule(pattern, qtype, [n for n in matched if n not in claimed])
    if wrong:  # llama.cpp's own rules won (an architecture's forced types): the file is not what the recipe says
        raise ToolchainError(f"llama.cpp did not apply the recipe of {recipe.name}: {'; '.join(wrong[:5])}; "
                             "change the rules that name those tensors")
    return {**recipe.to_params(), "applied": rules,
            "fallbacks": {n: t for r in rules for n, t in r["tensors"].items() if t != r["type"]}}
