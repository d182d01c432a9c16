"""How measurements are written for people, and read back from them: one formatter per kind of figure, shared
by cards, reports and the console; and the size parser for what people write (48GB, 500MB, 2GiB)."""

from __future__ import annotations


def format_pct(value: float | None, *, signed: bool = True, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}%}" if signed else f"{value:.{digits}%}"


def format_num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def format_duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{max(1, round(seconds / 60))} min"


def parse_size(value: str | int) -> int:
    """'48GB', '500MB', '2GiB', '1TB' or a byte count."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
