"""`formats.gguf` in targets.yaml: the types to make, and the variants a build may list among them
(formats/gguf_recipes.py turns a variant into a Recipe)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..config.schema import FormatSettings
from ..figures import format_size, parse_size
from ..gguf_types import GGUF_TYPES, IMATRIX_UNUSED, INTERMEDIATE_TYPES, NEEDS_IMATRIX
from .gguf_recipes import BUILTIN_VARIANTS, KV_MAX, MAX_NAME, TAG_RE, TENSOR_TYPES, UNQUANTIZED, Recipe, needs_imatrix


def upper_name(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _caseless(name: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)


def names_schema(names: Iterable[str]) -> dict[str, Any]:
    names = list(names)
    return {"anyOf": [{"enum": names}, {"type": "string", "pattern": f"^({'|'.join(map(_caseless, names))})$"}]}


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _tensor_type(value: str) -> str:
    if value in TENSOR_TYPES:
        return value
    if value in GGUF_TYPES:  # Q4_K_M is a mix of tensor types: its main one is Q4_K
        main = re.sub(r"_[SML]$", "", value)
        hint = f"; did you mean {main!r}?" if main in TENSOR_TYPES else did_you_mean(value, TENSOR_TYPES)
        raise ValueError(f"{value} is a file type (a mix of tensor types), not a tensor type{hint}")
    raise ValueError(f"unknown tensor type {value!r}{did_you_mean(value, TENSOR_TYPES)} (one of "
                     f"{', '.join(TENSOR_TYPES)})")


def _file_type(value: str) -> str:
    if value not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {value!r}{did_you_mean(value, GGUF_TYPES)}")
    return value


# any case, as llama-quantize takes them; the JSON Schema offers the names for completion
TensorType = Annotated[str, BeforeValidator(upper_name), AfterValidator(_tensor_type),
                       WithJsonSchema(names_schema(TENSOR_TYPES))]
BaseType = Annotated[str, BeforeValidator(upper_name), AfterValidator(_file_type),
                     WithJsonSchema(names_schema(GGUF_TYPES))]


def _size(value: str | int | None) -> str | int | None:
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError:
        raise ValueError(f"{value!r}: expected a size such as 4.2GB, 4200MB or a byte count") from None
    if size < 10**6:
        raise ValueError(f"{value!r}: at least 1MB (a GGUF file below that holds no model worth a search)")
    return value


def check_variant_name(name: str) -> str:
    """A declared variant's name: a tag Ollama and LM Studio can ask for, not a stock or builtin type's."""
    if name in GGUF_TYPES:
        raise ValueError(f"{name} is a stock llama.cpp type: give the variant a name of its own, such as {name}_X")
    if name in BUILTIN_VARIANTS:
        raise ValueError(f"{name} is a builtin variant ({BUILTIN_VARIANTS[name].describe()}): list it in types as "
                         "it is, or give yours another name")
    if not TAG_RE.fullmatch(name) or len(name) > MAX_NAME:
        raise ValueError(f"{name!r}: name a variant by a tensor type and capital letters, such as Q4_K_XL or "
                         f"IQ4_XS_L (at most {MAX_NAME} characters): the Hub, Ollama and LM Studio find a file by a "
                         "tag of that shape (hf.co/REPO:Q4_K_XL)")
    return name


class Budget(BaseModel):
    """`formats.gguf.variants.NAME.budget`: the file a search may make, by bits per weight or by size."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    bpw: float | None = Field(None, ge=3.5, le=8.5, description="Bits per weight of the whole file (its size x 8 / "
                              "the model's parameters, as llama.cpp prints it), e.g. 4.5.")
    size: Annotated[str | int | None, AfterValidator(_size)] = Field(
        None, description="The file's size, e.g. 4.2GB or 4200MB (1 GB = 10^9 bytes), or a byte count.")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.bpw is None) == (self.size is None):
            raise ValueError("give one of bpw (bits per weight, e.g. 4.5) or size (e.g. 4.2GB)")
        return self

    def to_params(self) -> dict[str, float | int]:
        return {"bpw": self.bpw} if self.bpw is not None else {"size": parse_size(self.size or 0)}

    def describe(self) -> str:
        return budget_words(self.to_params())


def budget_words(params: Mapping[str, float | int]) -> str:
    """A budget as its step's parameters hold it ({"bpw": 4.5} or {"size": bytes}), in words: cards say it so."""
    return f"{params['bpw']:g} bits per weight" if "bpw" in params else format_size(int(params["size"]))


class VariantSettings(BaseModel):
    """`formats.gguf.variants.NAME`: a stock type with some tensors stored in other types, or a budget for a search
    to choose every tensor's type in."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    base: BaseType | None = Field(None, description="The stock type every other tensor follows (Q4_K_M, …); with a "
                                  "budget, the file type the file is labelled with (default: from the name, Q4_K_M "
                                  "for Q4_K_…).")
    budget: Budget | None = Field(None, description="Instead of rules: the size the file may have; a search chooses "
                                  "every tensor's type to lose the least to the source within it (docs/recipes.md).")
    output: TensorType | None = Field(None, description="The type of the output head, output.weight "
                                      "(llama-quantize --output-tensor-type; with tied embeddings, the embeddings).")
    embeddings: TensorType | None = Field(None, description="The type of the token embeddings, token_embd.weight "
                                          "(llama-quantize --token-embedding-type).")
    tensors: dict[str, TensorType] = Field({}, description="Regular expression -> tensor type, for the tensors whose "
                                           "GGUF name it matches (searched, as llama-quantize --tensor-type does; "
                                           r"the first that matches wins), e.g. {'blk\.[0-3]\.ffn_down': Q6_K}.")

    @field_validator("tensors")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern, qtype in value.items():
            if not pattern:
                raise ValueError("an empty pattern matches every tensor: name the tensors")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
            # llama.cpp compiles patterns as C++ std::regex (ECMAScript): no (?P<…>), (?<=…), (?i) or the like
            if re.search(r"\(\?[^:!]", pattern):
                raise ValueError(f"{pattern!r}: llama.cpp's regular expressions (C++ std::regex, ECMAScript) know "
                                 "(?:…) and (?!…) but no other (?…) group")
            if "=" in pattern:  # llama-quantize splits --tensor-type PATTERN=TYPE at the first '='
                raise ValueError(f"{pattern!r}: a pattern cannot hold '=' (llama-quantize's --tensor-type splits at "
                                 "the first one)")
            # llama-quantize lowercases a --tensor-type pattern (so \D would become \d); GGUF names are lowercase
            if pattern != pattern.lower():
                raise ValueError(f"{pattern!r}: write patterns in lower case, as GGUF tensor names are (llama-quantize "
                                 r"lowercases them, which turns \D, \S, \W into \d, \s, \w)")
            if len(f"{pattern}={qtype}".encode()) > KV_MAX:
                raise ValueError(f"{pattern!r}: at most {KV_MAX - len(qtype) - 1} bytes (it is written into the file "
                                 "as a GGUF string of at most 127 bytes)")
        return value

    @model_validator(mode="after")
    def _changes_something(self) -> VariantSettings:
        if self.budget is not None:
            if self.output or self.embeddings or self.tensors:
                raise ValueError("budget: a search chooses every tensor's type; leave out output, embeddings and "
                                 "tensors (or drop the budget)")
            return self
        if self.base is None:
            raise ValueError("base: the stock type the variant is built on is missing (e.g. base: Q4_K_M)")
        if not (self.output or self.embeddings or self.tensors):
            raise ValueError(f"sets no tensor type: it would be {self.base} itself; give output, embeddings or "
                             "tensors")
        if self.base in UNQUANTIZED and self.tensors:
            # llama.cpp applies --tensor-type only when the file type is a quantized one
            raise ValueError(f"tensors: llama.cpp applies patterns only on a quantized base, not {self.base}")
        return self

    def recipe(self, name: str) -> Recipe:
        """The rules; for a budget, the base type alone (the search's step supplies the rules)."""
        return Recipe(name, self.base or searched_base(name) or "", self.output, self.embeddings,
                      tuple(self.tensors.items()))


# the stock mix a searched variant named after a K tensor type is labelled with (Q4_K_X: Q4_K_M)
_K_MIXES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K"}


def searched_base(name: str) -> str | None:
    """The file type a searched variant is labelled with when it names none, from the tensor type its name starts
    with; None when that is no quantized file type."""
    head = max((t for t in TENSOR_TYPES if name.startswith(t)), key=len, default=None)
    base = _K_MIXES.get(head or "", head)
    return base if base in GGUF_TYPES and base not in UNQUANTIZED else None


def _check_budget_base(name: str, settings: VariantSettings) -> None:
    if settings.budget is not None and settings.base is None and searched_base(name) is None:
        raise ValueError(f"{name}: say which file type it is labelled with (base: Q4_K_M, …): its name starts with no "
                         "quantized type")


VariantName = Annotated[str, AfterValidator(check_variant_name)]


# The JSON Schema (`quantforge schema`) offers the names for completion and accepts any case, as the validator does
TYPE_NAMES = (*GGUF_TYPES, *BUILTIN_VARIANTS)
TypeName = Annotated[Literal[TYPE_NAMES], BeforeValidator(upper_name),  # type: ignore[valid-type]
                     WithJsonSchema(names_schema(TYPE_NAMES))]


class GGUFSettings(FormatSettings):
    """`formats.gguf`: which llama.cpp types to produce."""

    format_name = "gguf"

    types: list[TypeName] = Field(["Q4_K_M", "Q8_0"], min_length=1,
                                  description="The llama.cpp types to make, one file each (case-insensitive). "
                                  f"{', '.join(NEEDS_IMATRIX)} need `imatrix: true`. Also bartowski's variants, a "
                                  "stock type with the output and embeddings at Q8_0: "
                                  f"{', '.join(f'{n} ({r.base})' for n, r in BUILTIN_VARIANTS.items())}.")
    intermediate: Literal[INTERMEDIATE_TYPES] = Field(  # type: ignore[valid-type]
        "auto", description="What the converter writes, the full-precision file every type is quantized from "
        "(auto: the highest-fidelity 16-bit type for the source's dtype).")
    imatrix: bool = Field(False, description="Weigh each type's quantization errors by an importance matrix computed "
                          "from the model's `calibration` text (one matrix serves every type; "
                          f"{', '.join(IMATRIX_UNUSED)} take none).")
    variants: dict[VariantName, VariantSettings] = Field(
        {}, description="Variants to make besides `types`, by name: a stock type with the output, the embeddings or "
        "the tensors a pattern matches stored in other types, e.g. {Q4_K_XL: {base: Q4_K_M, output: Q8_0, tensors: "
        r"{'blk\.[0-3]\.ffn_down': Q6_K}}}. A name is a tensor type and capital letters (a tag Ollama can ask for). "
        "A variant is published only if it beats the stock types of the build at its size (docs/recipes.md).")

    @model_validator(mode="before")
    @classmethod
    def _variants_not_in_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("types"), list) and isinstance(data.get("variants"), dict):
            listed = [t.upper() for t in data["types"] if isinstance(t, str) and t.upper() in data["variants"]
                      and t.upper() not in TYPE_NAMES]  # a variant named like a stock type: its name is the error
            if listed:
                raise ValueError(f"types: {', '.join(listed)} {'is' if len(listed) == 1 else 'are'} declared under "
                                 "variants, which makes it: leave it out of types")
        return data

    @field_validator("types")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({t for t in value if value.count(t) > 1})
        if dupes:
            raise ValueError(f"listed more than once: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _stock_to_compare_with(self) -> GGUFSettings:
        bases = [recipe.base for name in self.names() if (recipe := self.recipe(name)) is not None]
        if bases and len(bases) == len(self.names()):
            raise ValueError("a variant is published only if it beats the stock types of the same build at its size: "
                             f"list at least one stock type in types (e.g. {bases[0]})")
        return self

    @model_validator(mode="after")
    def _imatrix_for_lowest_bits(self) -> GGUFSettings:
        needs = [t for t in self.names() if t in NEEDS_IMATRIX or
                 ((recipe := self.recipe(t)) is not None and (recipe.base in NEEDS_IMATRIX or needs_imatrix(recipe)))]
        if needs and not self.imatrix:
            raise ValueError(f"{', '.join(needs)} need{'s' if len(needs) == 1 else ''} an importance matrix: "
                             "add imatrix: true")
        return self

    def names(self) -> list[str]:
        """What to make: the types, then the declared variants."""
        return [*self.types, *self.variants]

    @model_validator(mode="after")
    def _budget_bases(self) -> GGUFSettings:
        for name, variant in self.variants.items():
            _check_budget_base(name, variant)
        return self

    def budget(self, name: str) -> Budget | None:
        """A searched variant's budget; None for every other type."""
        variant = self.variants.get(name)
        return variant.budget if variant is not None else None

    def recipe(self, name: str) -> Recipe | None:
        """A variant's recipe (declared, or builtin; a searched one's base alone); None for a stock type."""
        if name in self.variants:
            return self.variants[name].recipe(name)
        return BUILTIN_VARIANTS.get(name)

    def weighted(self, name: str) -> bool:
        """Whether the type's quantization takes the importance matrix: some tensor of it is quantized below 8 bits."""
        recipe = self.recipe(name)
        kinds = {recipe.base, *recipe.types()} if recipe else {name}
        return bool(kinds - {*IMATRIX_UNUSED, *UNQUANTIZED})

    def artifact_count(self) -> int:
        return len(self.names())

    @classmethod
    def gate_type(cls, key: str, qtype: str) -> str:
        """A gate key's type part (`gguf/q4_k_m`), normalized; ValueError naming the closest type. A declared
        variant is held to its base type's limits; a builtin one may have its own."""
        if qtype.upper() not in TYPE_NAMES:
            raise ValueError(f"{key!r}: unknown GGUF type{did_you_mean(qtype.upper(), TYPE_NAMES)}")
        return qtype.upper()


