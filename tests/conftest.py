from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiers
from tiers import unmarked_heavy
from tiny_models import make_tiny_model

import quantforge.pipeline  # noqa: F401  (registers every format and step kind, as a build does)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the fast tier fast: a test using a fixture that builds a model must be marked slow (tests/tiers.py)."""
    unmarked = unmarked_heavy(items)
    if unmarked:
        raise pytest.UsageError("these tests build models but are not marked slow; add @pytest.mark.slow (or a "
                                "module-level pytestmark):\n  " + "\n  ".join(unmarked))


@pytest.fixture(autouse=True)
def _environment():
    """Each test gets the environment the session started with. A library imported in-process can set variables
    for the whole process (gptqmodel, through tokenicer, points HF_HOME and HF_HUB_CACHE at /tmp when transformers
    loads a GPTQ checkpoint), and every later test's subprocess would inherit them."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _tier(request: pytest.FixtureRequest):
    tiers.current = request.node
    yield
    tiers.current = None


@pytest.fixture
def write_targets(tmp_path: Path):
    def write(text: str, name: str = "targets.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture(scope="session")
def converter():
    from quantforge.toolchains.llamacpp import provision_converter

    return provision_converter()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, converter):
    root = tmp_path_factory.mktemp("tiny-models")

    def get(family: str, hidden: int = 64, tied: bool = True) -> Path:
        return make_tiny_model(family, converter.vocab_dir, root / f"{family}-{hidden}{'' if tied else '-untied'}",
                               hidden=hidden, tied=tied)

    return get


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    from prepare_smollm2 import prepare

    return prepare(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
