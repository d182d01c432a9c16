"""README.md is a door, docs/ holds the rest: every page is reachable from the README, every relative link lands on
a file (and a heading), and what the pages list is what the code offers."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from conftest import REPO

from quantforge.cli import app
from quantforge.gguf_types import GGUF_TYPES
from quantforge.pipeline import load_targets

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower()).replace(" ", "-")
    return "".join(c for c in text if c.isalnum() or c in "-_")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_the_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    linked = {(README.parent / target.split("#")[0]).resolve() for target in LINK.findall(text)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


def test_every_relative_link_lands_on_a_file_and_a_heading():
    broken = []
    for page in [README, *PAGES]:
        for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):  # links, not examples
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_files_pyproject_cites_exist():
    cited = re.findall(r"[\w./-]+\.(?:md|txt|py)\b", (REPO / "pyproject.toml").read_text())
    assert cited and [c for c in cited if not (REPO / c).exists()] == []


def test_the_readme_cli_lists_the_commands_there_are():
    text = README.read_text()
    listed = {tuple(line.split()[1:3]) for line in text.splitlines() if line.startswith("quantforge ")}
    commands = set()
    for name, command in typer.main.get_command(app).commands.items():
        subs = getattr(command, "commands", {})  # a group: report merge, ci init
        commands |= {(name, sub) for sub in subs} or {(name,)}
    shown = {words[:2] if words[:2] in commands else words[:1] for words in listed}
    assert commands <= shown, commands - shown  # each command shown
    assert shown <= commands, shown - commands  # and none that is not there


def test_the_formats_page_lists_every_gguf_type():
    page = (REPO / "docs" / "formats.md").read_text()
    assert [t for t in GGUF_TYPES if not re.search(rf"\b{t}\b", page)] == []


def test_the_targets_files_the_docs_show_are_valid(tmp_path):
    shown = [(page.name, block) for page in [README, *PAGES]
             for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), flags=re.S) if "\nmodels:" in block]
    assert len(shown) >= 2  # the README's and the reference page's
    for i, (name, block) in enumerate(shown):
        path = tmp_path / f"{i}.yaml"
        path.write_text(block)
        assert load_targets(path).models, name
