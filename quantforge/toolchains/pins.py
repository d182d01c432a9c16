"""Tool versions for cache keys: the installed tool's, or the version the constraints file pins.

A nightly's plan job needs the versions of the tools that enter step keys (llama-cpp-python, GPTQModel), not the
tools: it installs quantforge without them, and reads their versions from the pip constraints file every leg
installs with (`QUANTFORGE_CONSTRAINTS`, which the workflow names), so that its keys are the legs' keys. Where a
tool is installed, its own version counts (it is what runs); a pin that disagrees with it is logged, since a
plan job would then compute other keys.
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..errors import BadInputError, ToolchainError

ENV = "QUANTFORGE_CONSTRAINTS"
# what the tools whose versions enter step keys (each format's Format.key_tools) run with: `ci init` pins them too
RUNTIME = ("torch", "transformers")
_PIN_RE = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9][A-Za-z0-9._+!-]*)\s*(?:#.*)?")

log = logging.getLogger(__name__)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tool_version(package: str) -> str:
    """The installed version of `package`, else the constraints file's pin; ToolchainError when neither."""
    try:
        installed = metadata.version(package)
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None:
        try:
            pinned = constraint_pins().get(canonical(package))
        except BadInputError:  # the pin is not needed here: an unreadable file only costs the warning
            pinned = None
        if pinned is not None and public_version(installed) != pinned:
            log.warning("%s %s is installed but %s pins %s: keys follow the installed one", package, installed,
                        os.environ.get(ENV), pinned)
        return installed
    pinned = constraint_pins().get(canonical(package))
    if pinned is not None:
        return pinned
    where = f" and {os.environ[ENV]} ({ENV}) pins no version of it" if os.environ.get(ENV) else ""
    raise ToolchainError(f"{package} is not installed{where}; run the README's set-up command, or name a pip "
                         f"constraints file pinning it ({package}==VERSION) in {ENV}")


def constraint_pins() -> dict[str, str]:
    """canonical name -> version, of the `NAME==VERSION` lines of $QUANTFORGE_CONSTRAINTS (none when unset)."""
    path = os.environ.get(ENV, "").strip()
    return read_pins(Path(path)) if path else {}


@lru_cache(maxsize=8)
def _read(path: str, stamp: tuple[int, int]) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = _PIN_RE.fullmatch(line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def read_pins(path: Path) -> dict[str, str]:
    try:
        st = path.stat()
        return _read(str(path.resolve()), (st.st_size, st.st_mtime_ns))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{ENV}={path}: cannot read the constraints file ({exc})") from None


def public_version(version: str) -> str:
    """`2.13.0+cpu` -> `2.13.0`: what a pin names (the local label says which build; pins match any)."""
    return version.split("+", 1)[0]


def installed_pins(packages: tuple[str, ...]) -> dict[str, str | None]:
    """package -> its installed version (local label dropped), None when it is not installed."""
    out: dict[str, str | None] = {}
    for package in packages:
        try:
            out[package] = public_version(metadata.version(package))
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
