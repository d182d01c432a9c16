"""A format's settings model (`formats.<name>`): the base every format's module subclasses, the registry that
defining one fills, and what the formats calibrated on text share."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from .fields import Strict, TextSpec

_FORMAT_SETTINGS: dict[str, type[FormatSettings]] = {}


class FormatSettings(Strict):
    """Base of a format's settings model (`formats.<name>`). A subclass that sets `format_name` is that format's
    schema: defining it registers it (formats/<name>.py), and the loader offers what is registered."""

    format_name: ClassVar[str] = ""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "format_name" in cls.__dict__:
            _FORMAT_SETTINGS[cls.format_name] = cls

    def artifact_count(self) -> int:
        return 1

    def repo_label(self) -> str:
        """What `{FORMAT}` in `publish.repo` stands for (`{format}`: the same in lower case): the format's name in
        capitals; a format whose repo holds one of the variants it can make adds which (a bit width, a scheme)."""
        return self.format_name.upper()

    @classmethod
    def gate_type(cls, key: str, qtype: str) -> str:
        """The type part of a gate key such as `gguf/Q4_K_M`, checked; formats without types refuse one."""
        fmt = key.split("/")[0]
        raise ValueError(f"{key!r}: {fmt} makes one checkpoint; write {fmt!r} without a type")


def format_settings() -> dict[str, type[FormatSettings]]:
    """Format name -> settings model, for every format whose module has been imported."""
    return dict(_FORMAT_SETTINGS)


# The group sizes a real model can be quantized with: -1 (one group per row) or a power of two from 16 to 1024, the
# union of what GPTQModel 7.6's kernels declare (SUPPORTS_GROUP_SIZE). Whether one divides every layer's input
# size, and is not above the model's hidden size, is checked against the model itself (at plan time, and before
# quantizing).
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


class CalibratedSettings(FormatSettings):
    """What formats calibrated on text share (GPTQ, AWQ): bit width, groups, and their own calibration text."""

    bits: int = 4
    group_size: int = Field(128, description="Columns that share one scale; -1: one group per row. Must divide "
                            "every quantized layer's input size (checked before anything heavy runs).")
    samples: int | None = Field(None, ge=1, le=100000, description="Calibration windows for this format "
                                "(unset: the model's `calibration.samples`).")
    seq_len: int | None = Field(None, ge=16, le=32768, description="Tokens per calibration window for this format "
                                "(unset: `calibration.seq_len`).")
    dataset: TextSpec | None = Field(None, description="The calibration text for this format (unset: "
                                     "`calibration.dataset`); the same forms as `evaluation.dataset`.")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value not in GROUP_SIZES:
            raise ValueError(f"expected -1 (one group per row) or one of {', '.join(map(str, GROUP_SIZES[1:]))} "
                             "(the sizes GPTQModel's kernels load; vLLM's Marlin kernels take 32, 64 and 128)")
        return value

    def quantize_params(self) -> dict[str, Any]:
        """The settings the quantization itself uses (its calibration text is a step of its own)."""
        return self.model_dump(exclude={"samples", "seq_len", "dataset"})
