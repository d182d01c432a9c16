"""A model's declared model tree and licence (`base_model`, `license`, `license_name`, `license_link`), checked
against what the Hub accepts in a card's front matter: a repo id, and one of the Hub's licence ids (the list
its repo-creation API takes), or `other` with a name and a link."""

from __future__ import annotations

import difflib
import re
from typing import Any

# The Hub's licence ids (huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl
gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr
mpl-2.0 odc-by odbl open-mdw openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma
unknown other
""".split())
_LICENSE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")  # the Hub's form for license_name: lowercase, no spaces
_URL_RE = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")
_REPO_FILES = ("LICENSE", "LICENSE.md")  # a relative link the Hub accepts: a file in the repo itself


def check_license(value: str) -> str:
    if value not in HUB_LICENSES:
        close = difflib.get_close_matches(value.lower(), sorted(HUB_LICENSES), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "use 'other' with license_name and license_link"
        raise ValueError(f"{value!r} is not a Hub licence id (apache-2.0, mit, llama3.1, gemma, ...); {hint}")
    return value


def check_license_name(value: str) -> str:
    if not _LICENSE_NAME_RE.fullmatch(value) or len(value) > 100:
        raise ValueError("a short lowercase id such as my-model-license (letters, digits, '.', '_', '-')")
    return value


def check_license_link(value: str) -> str:
    if value in _REPO_FILES or _URL_RE.fullmatch(value):
        return value
    raise ValueError("expected the licence text's URL (https://...), or LICENSE / LICENSE.md")


def check_release(settings: Any) -> None:
    """license_name and license_link go with license: other (the Hub shows them in place of a known licence)."""
    extra = [k for k in ("license_name", "license_link") if getattr(settings, k) is not None]
    if settings.license == "other" and len(extra) < 2:
        raise ValueError("license: other needs license_name and license_link (the licence's id and its text)")
    if extra and settings.license != "other":
        raise ValueError(f"{' and '.join(extra)} go with license: other")
