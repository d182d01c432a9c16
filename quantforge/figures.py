"""How measurements are written for people: one formatter per kind of figure, shared by cards, reports and
the console."""

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
