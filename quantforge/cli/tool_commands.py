"""The commands around builds: report merge, ci init, schema, doctor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import QuantforgeError
from .common import JsonOpt, LlamaCppOpt, _fail, app

report_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Build reports.")
app.add_typer(report_app, name="report")
ci_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Nightly builds on GitHub Actions.")
app.add_typer(ci_app, name="ci")


@report_app.command("merge")
def report_merge(
        reports: Annotated[list[Path], typer.Argument(help="Legs' reports: build --json output or a work dir's "
                                                      "reports/*.json.", show_default=False)],
        json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the merged report here.",
                                                      metavar="FILE")] = None,
        matrix: Annotated[Path | None, typer.Option("--matrix", help="The plan's matrix JSON: a leg in it without a "
                                                    "report counts as failed.", metavar="FILE")] = None) -> None:
    """Join a nightly's leg reports: Markdown for $GITHUB_STEP_SUMMARY on stdout; exit 1 when a leg failed."""
    from ..report import merge, merged_markdown
    from ..store import finite_json

    expected: list[str] = []
    if matrix is not None:
        try:
            expected = [leg["model"] for leg in json.loads(matrix.read_text(encoding="utf-8"))["include"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            typer.echo(f"error: --matrix {matrix}: not a matrix from plan --github-matrix ({exc})", err=True)
            raise typer.Exit(2) from None
    merged = merge(reports, expected)
    if json_out is not None:
        json_out.write_text(json.dumps(finite_json(merged), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    typer.echo(merged_markdown(merged))
    raise typer.Exit(0 if merged["ok"] else 1)


@ci_app.command("init")
def ci_init(targets: Annotated[Path, typer.Option("--targets", help="The targets file the nightly builds.")]
            = Path("targets.yaml"),
            out: Annotated[Path, typer.Option("--out", help="The repository's root: the workflow goes to "
                                              ".github/workflows/nightly.yml under it.")] = Path("."),
            force: Annotated[bool, typer.Option("--force", help="Overwrite an existing workflow (and the default "
                                                "constraints file).")] = False,
            install: Annotated[str | None, typer.Option("--install", metavar="SPEC", help=(
                "What the jobs pip-install quantforge from (default: -e . in its own repository, else a git URL "
                "pinned to this quantforge's commit)."))] = None,
            constraints: Annotated[Path | None, typer.Option("--constraints", metavar="FILE", help=(
                "Your own pip constraints file pinning the tools (default: .github/quantforge-constraints.txt, "
                "written with the versions installed here)."))] = None) -> None:
    """Write the nightly workflow (plan -> a build leg per stale model -> one summary) into a repository."""
    from ..nightly import write_workflow
    from ..pipeline import load_targets

    try:
        load_targets(targets)  # a workflow for a file that does not validate would fail every night
        written = write_workflow(targets, out, force=force, install=install, constraints=constraints)
    except QuantforgeError as exc:
        raise _fail(exc) from None
    for warning in written.install.warnings:
        typer.echo(f"warning: {warning}", err=True)
    pins = ", ".join(f"{name}=={version}" for name, version in written.pins.items())
    typer.echo(f"wrote {written.workflow}: the jobs install {written.install.spec} ({written.install.how})\n"
               f"{'wrote' if written.constraints_written else 'kept'} {written.constraints}: {pins}\nadd an HF_TOKEN "
               "secret with write access (Settings > Secrets and variables > Actions), then commit both files")


@app.command()
def schema(markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print the reference page instead (docs/targets-reference.md).")] = False) -> None:
    """Print the JSON Schema of targets.yaml, for editors' completion (see docs/targets-reference.md)."""
    from ..schema_export import reference_markdown, schema_json

    typer.echo(reference_markdown() if markdown else schema_json(), nl=False)


@app.command()
def doctor(json_output: JsonOpt = False, llama_cpp: LlamaCppOpt = None,
           require_gpu: Annotated[bool, typer.Option(
               "--require-gpu", help="Fail (exit 1) unless torch sees a CUDA device and llama.cpp was built with GPU "
                                     "offload: a GPU leg's first step.")] = False) -> None:
    """Report the toolchain: versions, llama.cpp converter, GPU."""
    from ..doctor import collect

    info = collect(llama_cpp, require_gpu=require_gpu)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            typer.echo(f"{key:<22} {value}")
    if require_gpu and info["gpu required"] != "ok":
        typer.echo(f"error: --require-gpu: {info['gpu required']}", err=True)
    raise typer.Exit(0 if info.get("problems") in (None, "none") else 1)
