"""Which protocol quantforge's Hub transfers use: the LFS/HTTP path it is tested with, unless the user opts in to
Xet (QUANTFORGE_HUB_XET=1).

huggingface_hub 2.x uploads through Xet whenever the `hf_xet` package imports (and it is one of its dependencies),
deciding on the client alone: `_commit_api._upload_files` asks `utils._runtime.is_xet_available()`, which reads
`constants.HF_HUB_DISABLE_XET` (set from the environment once, when huggingface_hub is imported) and whether hf_xet
is installed; the server is not asked (huggingface_hub issue #4786), so a Hub that does not answer the Xet token
request fails the upload with no fallback (#4507). quantforge's publishing tests run against a loopback Hub that
speaks the documented LFS protocol (preupload, LFS batch, PUT, NDJSON commit), so that is the path its uploads
take: `hub_transfers()` sets the constant for the duration of each of its own Hub calls and puts it back after,
leaving other code in the process as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec

XET_ENV = "QUANTFORGE_HUB_XET"


def xet_opted_in() -> bool:
    return os.environ.get(XET_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def hub_transfers() -> Iterator[None]:
    """Run quantforge's own Hub calls inside this: LFS/HTTP, or huggingface_hub's own choice with the opt-in."""
    from huggingface_hub import constants

    if xet_opted_in():
        yield
        return
    before = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = before


def upload_protocol() -> str:
    """What `quantforge doctor` says about Hub uploads on this machine."""
    if not xet_opted_in():
        return (f"LFS (the protocol quantforge is tested with; {XET_ENV}=1 lets huggingface_hub use Xet"
                + (")" if find_spec("hf_xet") else ", which needs the hf_xet package)"))
    if find_spec("hf_xet") is None:
        return f"LFS ({XET_ENV}=1, but the hf_xet package is not installed)"
    if _env_true("HF_HUB_DISABLE_XET"):
        return f"LFS ({XET_ENV}=1, but HF_HUB_DISABLE_XET is set)"
    return f"Xet ({XET_ENV}=1; not covered by quantforge's tests)"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
