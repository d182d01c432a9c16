"""What a value typed into targets.yaml may hold: characters that show as themselves."""

from __future__ import annotations

import unicodedata

# Unicode categories of characters that show as nothing, or make other characters show as what they are not:
# controls (Cc), format characters (Cf: the bidirectional overrides, with which "dir:out/\u202egguf.exe" reads as
# "dir:out/exe.fugg", zero-width spaces and joiners, the BOM), surrogates, private use, unassigned code points,
# and line and paragraph separators. A space other than U+0020 (Zs) is refused too: it looks like one.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

def visible(value: str) -> str:
    """`value`, when every character in it shows as itself (see _INVISIBLE); else a ValueError naming the first
    one that does not, e.g. "U+202E RIGHT-TO-LEFT OVERRIDE"."""
    for i, ch in enumerate(value):
        category = unicodedata.category(ch)
        if category in _INVISIBLE or (category == "Zs" and ch != " "):
            name = unicodedata.name(ch, "a control character" if category == "Cc" else "(no name)")
            raise ValueError(f"contains U+{ord(ch):04X} {name} (character {i + 1}), which shows as nothing or "
                             "as something else; retype the value without it")
    return value
