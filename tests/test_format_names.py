"""A format owns its steps: outside `formats/` and the assembler's registry line, no module names a format or one
of its step kinds. What a step costs, how it is published, how it is carded is asked of the registries, so a new
format is one module, its card template and a line in `pipeline.FORMAT_MODULES`."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

from quantforge.core.registry import registered_kinds
from quantforge.pipeline import FORMATS

REPO = Path(__file__).resolve().parents[1]
# Where naming them is the point: the formats themselves, and the assembler that lists them. The toolchains are
# the tools a format drives and speak those tools' words: GPTQModel's methods are called "gptq" and "awq".
OWNERS = ("formats/", "pipeline.py", "toolchains/")
# The same word meaning something else: the `gguf` Python package (llama.cpp's gguf-py) that doctor imports.
OTHER_MEANINGS = {("doctor.py", "gguf")}


def format_words() -> tuple[set[str], set[str]]:
    """The format names, and the step kinds the format modules register."""
    kinds = {kind for kind, info in registered_kinds().items()
             if info.run.__module__.startswith("quantforge.formats.")}
    return set(FORMATS), kinds


def named_formats(package: Path) -> list[str]:
    """'module:line: literal' for every string literal in `package` outside OWNERS that is a format's name or
    one of its step kinds (registered, or shaped like one: `<format>.<step>`)."""
    names, kinds = format_words()
    shaped = re.compile(rf"^({'|'.join(map(re.escape, sorted(names)))})\.[a-z_]+$")
    found = []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        if module.startswith(OWNERS):
            continue
        for node in ast.walk(ast.parse(path.read_text(), module)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    (module, node.value) not in OTHER_MEANINGS and \
                    (node.value in names or node.value in kinds or shaped.match(node.value)):
                found.append(f"{module}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_outside_the_formats_names_a_format_or_its_step_kinds():
    names, kinds = format_words()
    assert {"gguf", "gptq", "awq"} <= names and {"gguf.quantize", "gptq.quantize", "checkpoint.verify"} <= kinds
    assert named_formats(REPO / "quantforge") == []


def test_a_kind_switch_planted_in_steps_is_found(tmp_path):
    package = tmp_path / "quantforge"
    shutil.copytree(REPO / "quantforge", package, ignore=shutil.ignore_patterns("__pycache__"))
    disk = package / "steps" / "disk.py"
    disk.write_text(disk.read_text() + '\n\ndef _cost(step):\n    return 1 if step.kind == "gguf.quantize" else 0\n')
    memory = package / "steps" / "memory.py"
    memory.write_text(memory.read_text() + '\n\nCALIBRATED = ("awq.quantize", "gptq.calibrate")\n')
    card = package / "card.py"
    card.write_text(card.read_text() + '\n\ndef _lib(fmt):\n    return "gguf" if fmt == "gguf" else "transformers"\n')
    found = named_formats(package)
    assert [f.split(":")[0] for f in found] == ["card.py", "card.py", "steps/disk.py", "steps/memory.py",
                                                "steps/memory.py"], found
    assert found[2].endswith("'gguf.quantize'")
    # a kind no module registers is still a format's when it is shaped like one
    assert found[4].endswith("'gptq.calibrate'")
