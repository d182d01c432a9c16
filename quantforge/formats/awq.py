"""AWQ through GPTQModel, written as GEMM (`quant_method: awq`, `version: gemm`, fp16 scales, zero points),
the layout transformers, vLLM and TGI read. The steps are those of every GPTQModel checkpoint
(steps/checkpoint.py); the settings are declared once, here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ..config.schema import CalibratedSettings
from ..core.formats import register_format
from ..steps import checkpoint


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


FORMAT = register_format(AWQ())
