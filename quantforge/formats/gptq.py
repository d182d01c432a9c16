"""GPTQ through GPTQModel, written in the classic (v1) checkpoint format: `quant_method: gptq`,
`checkpoint_format: gptq`, and a `quantize_config.json` beside `config.json`, which transformers, vLLM and TGI
all read. The steps are those of every GPTQModel checkpoint (formats/checkpoint.py); the settings are declared
once, here, and give the step's parameters, GPTQModel's arguments and the card's description."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..config.schema import CalibratedSettings
from ..core.formats import register_format
from ..core.registry import step_kind
from . import checkpoint


class GPTQSettings(CalibratedSettings):
    """`formats.gptq`: GPTQ through GPTQModel, written in the classic (v1) checkpoint format."""

    format_name = "gptq"

    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight.")
    desc_act: bool = Field(False, description="Quantize columns in order of activation (slower kernels in some "
                           "runtimes); false keeps the groups in column order.")
    sym: bool = Field(True, description="Symmetric quantization (no zero points).")
    damp: float = Field(0.01, gt=0, lt=1, description="Dampening added to the Hessian's diagonal, as a fraction of "
                        "its mean.")

    def gptqmodel_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym,
                "damp_percent": self.damp}

    def card_settings(self) -> list[str]:
        return [f"{self.bits}-bit", f"group size {self.group_size}", f"desc_act {str(self.desc_act).lower()}",
                f"sym {str(self.sym).lower()}", f"damp {self.damp}"]


class GPTQ(checkpoint.CheckpointFormat):
    name = "gptq"
    settings = GPTQSettings

    def runtimes(self, bits: int) -> list[str]:
        # the versions are those that added the format to transformers
        lines = ["**transformers** ≥ 4.32 with `optimum` and a GPTQ kernel package: auto-gptq up to transformers 4.x, "
                 "GPTQModel from transformers 5 on (auto-gptq no longer imports there)",
                 "**vLLM** reads the GPTQ settings from `config.json` (NVIDIA GPUs; Marlin kernels for 4- and 8-bit "
                 "checkpoints)",
                 "**Text Generation Inference**: `--quantize gptq`"]
        if bits not in (4, 8):
            lines.append(f"{bits}-bit GPTQ has fewer fast kernels than 4- and 8-bit: check your runtime's list")
        return lines


step_kind("gptq.quantize", version="1", stage="artifact",
          estimates=checkpoint.quantize_estimates())(checkpoint.run_quantize)
FORMAT = register_format(GPTQ())
