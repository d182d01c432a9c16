"""AWQ through GPTQModel, written as GEMM (`quant_method: awq`, `version: gemm`, fp16 scales, zero points),
the layout transformers, vLLM and TGI read. The steps are those of every GPTQModel checkpoint
(formats/checkpoint.py); the settings are declared once, here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..config.schema import CalibratedSettings
from ..core.formats import register_format
from ..core.registry import step_kind
from . import checkpoint


class AWQSettings(CalibratedSettings):
    """`formats.awq`: AWQ through GPTQModel, written as GEMM (the layout vLLM, TGI and transformers read)."""

    format_name = "awq"

    bits: Literal[4] = Field(4, description="Bits per weight: the GEMM kernels are 4-bit only.")
    zero_point: bool = Field(True, description="Asymmetric quantization with zero points.")

    @field_validator("group_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value == -1:
            raise ValueError("AWQ needs groups: use 32, 64 or 128")
        return value

    def gptqmodel_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "method": "awq", "format": "gemm",
                "sym": not self.zero_point}

    def card_settings(self) -> list[str]:
        return [f"{self.bits}-bit", f"group size {self.group_size}", f"zero point {str(self.zero_point).lower()}",
                "GEMM"]


class AWQ(checkpoint.CheckpointFormat):
    name = "awq"
    settings = AWQSettings

    def runtimes(self, bits: int) -> list[str]:
        return ["**transformers** ≥ 4.35: AutoAWQ up to transformers 4.x, GPTQModel from transformers 5 on "
                "(AutoAWQ is deprecated and does not import there)",
                "**vLLM** reads the AWQ settings from `config.json` (NVIDIA GPUs; GEMM, 4-bit)",
                "**Text Generation Inference**: `--quantize awq`"]


# GPTQModel's AWQ takes 3.3 min per layer where its GPTQ takes 30 s (SmolLM2 135M, 32 x 512 tokens, 2 cores)
AWQ_SLOWER = 3.3 * 60 / 30
step_kind("awq.quantize", version="1", stage="artifact",
          estimates=checkpoint.quantize_estimates(AWQ_SLOWER))(checkpoint.run_quantize)
FORMAT = register_format(AWQ())
