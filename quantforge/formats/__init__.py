"""Output formats. Each is one module exposing
`plan(model, target, source, evaluation, context, calibration) -> PlannedFormat`;
its step kinds are registered in `quantforge.runners`."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from ..plan import Step


@dataclass
class PlannedFormat:
    steps: list[Step] = field(default_factory=list)
    # artifact name -> (the step whose output holds the file, the step that checked it with its real consumer)
    publishable: dict[str, tuple[Step, Step]] = field(default_factory=dict)


def _load(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


class _Registry(dict):
    """format name -> module, imported on first use."""

    def __missing__(self, name: str) -> ModuleType:
        if name not in _KNOWN:
            raise KeyError(name)
        module = self[name] = _load(name)
        return module


_KNOWN = ("gguf", "gptq", "awq")
FORMATS: _Registry = _Registry()
