"""The layers hold: imports run one way (the import-linter contracts in pyproject.toml), and the contracts catch
an upward import even when it hides inside a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the package under `root` (with the project's contracts)."""
    env = {"PYTHONPATH": str(root), "PATH": ""}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(REPO / "pyproject.toml"),
                           "--no-cache"], capture_output=True, text=True, cwd=root, env=env)


def test_the_package_keeps_its_import_contracts():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def _copy_with(tmp_path: Path, module: str, line: str) -> Path:
    root = tmp_path / "src"
    shutil.copytree(REPO / "quantforge", root / "quantforge", ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "quantforge" / module
    path.write_text(path.read_text() + line)
    return root


def test_an_upward_import_inside_a_function_breaks_the_contract(tmp_path):
    # the core reaching up into a format, the way the old plan module assembled everything
    root = _copy_with(tmp_path, "core/plan.py", "\n\ndef _sneaky():\n    from ..formats import gguf  # noqa\n")
    proc = lint_imports(root)
    assert proc.returncode != 0
    assert "quantforge.core.plan -> quantforge.formats.gguf" in proc.stdout


def test_a_sideways_import_between_formats_and_publish_breaks_the_contract(tmp_path):
    root = _copy_with(tmp_path, "publish/localdir.py", "\nfrom ..formats import gguf  # noqa\n")
    proc = lint_imports(root)
    assert proc.returncode != 0 and "quantforge.publish.localdir -> quantforge.formats.gguf" in proc.stdout


def test_a_cycle_inside_a_layer_breaks_the_contract(tmp_path):
    root = _copy_with(tmp_path, "steps/evaluation.py", "\n\ndef _loop():\n    from . import calibration  # noqa\n")
    proc = lint_imports(root)
    assert proc.returncode != 0 and "No cycles are allowed in quantforge.steps" in proc.stdout


def test_package_faces_hold_no_logic_their_modules_import_back():
    # import-linter's cycle check sees `from . import X` as an import of the package, which a module of the
    # package always has: so the rule is checked here. A face re-exports; nothing below imports names from it.
    import ast

    for package in ("publish", "formats", "steps", "core", "config", "toolchains"):
        folder = REPO / "quantforge" / package
        face = ast.parse((folder / "__init__.py").read_text())
        assert not [n for n in face.body if isinstance(n, ast.FunctionDef | ast.ClassDef)], f"{package}/__init__"
        submodules = {p.stem for p in folder.glob("*.py")}
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
                    names = {alias.name for alias in node.names}
                    assert names <= submodules, f"{package}/{path.name} imports {names - submodules} from the face"
