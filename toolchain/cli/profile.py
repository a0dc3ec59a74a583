"""`toolchain profile` (params, multiply-adds, file sizes) and `toolchain check` (budget gate).

Thin: parses, calls toolchain.profile, prints. torch/fvcore load only when a model is profiled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from toolchain.cli.common import logged

from toolchain.errors import ToolchainError


def _console(stderr: bool = False):
    import sys

    from rich.console import Console

    from toolchain.console import own_stderr

    stream = own_stderr if stderr else sys.stdout
    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    width = None if stream.isatty() else 160
    return Console(file=stream if stderr else None, width=width)


def _is_file_target(target: str) -> bool:
    from toolchain.profile.files import ARTIFACT_SUFFIXES

    return (
        os.path.exists(target)
        or Path(target).suffix.lower() in ARTIFACT_SUFFIXES
        or os.sep in target
    )


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.command("profile")
@click.argument("target", required=False, metavar="MODEL|FILE")
@click.option("--all", "all_models", is_flag=True, help="Profile every registered model.")
@click.option("--input-size", type=click.IntRange(min=1), metavar="N",
              help="Profile on an N x N input instead of the model's own size.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--markdown", is_flag=True, help="Print Markdown, with a per-layer breakdown.")
@click.option("--depth", type=click.IntRange(min=0), default=2, show_default=True,
              help="Module depth of the per-layer breakdown (--markdown).")  # fmt: skip
@logged("profile.log", None)
def profile(target, all_models, input_size, as_json, markdown, depth) -> None:
    """Parameters and multiply-adds of a model, or size and sha256 of a file.

    MODEL is a registered model name (see --all); FILE an exported artifact (.tflite, .pte).
    Convention: `macs` = conv/linear/matmul multiply-adds plus pooling windows, batch 1;
    `flops` = 2 x macs; BatchNorm and elementwise ops are reported apart as
    `elementwise_ops`; ops without a counting handler are listed in `unsupported_ops`.
    """
    from toolchain.profile import render

    if as_json and markdown:
        raise click.UsageError("choose one of --json and --markdown")
    if all_models == bool(target):
        raise click.UsageError("give one MODEL or FILE, or --all")

    if all_models:
        from rich.progress import Progress

        from toolchain.models import list_models
        from toolchain.profile import profile_model

        names = list_models()
        profiles = []
        with Progress(console=_console(stderr=True), transient=True) as progress:
            task = progress.add_task("profiling", total=len(names))
            for name in names:
                progress.update(task, description=f"profiling {name}")
                profiles.append(profile_model(name, input_size))
                progress.advance(task)
        if as_json:
            _echo_json(profiles)
        elif markdown:
            click.echo(render.profiles_markdown(profiles))
        else:
            _console().print(render.profile_table(profiles, title="Model zoo (batch 1)"))
        return

    if _is_file_target(target):
        from toolchain.profile import profile_file

        if input_size is not None:
            raise click.UsageError("--input-size applies to models, not files")
        info = profile_file(target)
        if as_json:
            _echo_json(info)
        elif markdown:
            click.echo(f"| path | bytes | sha256 |\n|---|---:|---|\n"
                       f"| {info['path']} | {info['bytes']:,} | `{info['sha256']}` |")  # fmt: skip
        else:
            _console().print(render.file_table(info))
        return

    from toolchain.profile import profile_model, profile_with_layers

    if markdown:
        summary, layers = profile_with_layers(target, input_size, max_depth=depth)
        click.echo(render.profile_markdown(summary, layers))
        return
    summary = profile_model(target, input_size)
    if as_json:
        _echo_json(summary)
    else:
        _console().print(render.profile_table([summary]))
        if summary["unsupported_ops"]:
            click.echo("note: ops without a handler counted as zero; totals are lower bounds",
                       err=True)  # fmt: skip


def _print_rows(rows, as_json: bool, passed: bool) -> None:
    from toolchain.profile import render

    if as_json:
        _echo_json({"passed": passed, "results": render.budget_rows_json(rows)})
    else:
        _console().print(render.budget_table(rows))


def _check_run_dir(path: str, as_json: bool) -> None:
    import importlib

    try:
        verify = importlib.import_module("toolchain.pipeline.verify")
    except ModuleNotFoundError as exc:
        if exc.name in ("toolchain.pipeline", "toolchain.pipeline.verify"):
            raise ToolchainError(
                f"cannot check run directory {path}: toolchain.pipeline.verify is not available"
            ) from None
        raise
    try:
        rows = verify.check_run_dir(path)
    except ToolchainError as exc:
        rows = getattr(exc, "results", None) or getattr(exc, "rows", None)
        if rows:
            _print_rows(rows, as_json, passed=False)
        raise
    rows = list(rows or [])
    _print_rows(rows, as_json, passed=all(_passed(r) for r in rows))
    from toolchain.profile import raise_if_failed

    raise_if_failed([_Row(r) for r in rows])


def _passed(row) -> bool:
    return bool(row.get("passed") if isinstance(row, dict) else getattr(row, "passed", False))


class _Row:
    """Adapter so raise_if_failed reads dict rows like BudgetResult."""

    def __init__(self, row) -> None:
        self.name = row.get("name") if isinstance(row, dict) else getattr(row, "name", "?")
        self.passed = _passed(row)


@click.command("check")
@click.argument("targets", nargs=-1, metavar="[MODEL ...] | RUN_DIR")
@click.option("--budgets", "budgets_path", metavar="FILE.yaml",
              help="Budgets file: per model max_params, max_macs, max_flops, max_bytes, ...")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@logged("check.log", None)
def check(targets, budgets_path, as_json) -> None:
    """Check models against a budgets file, or re-verify a finished run directory.

    With --budgets, checks every model of the file (or only the MODELs named). With one
    RUN_DIR, re-verifies the run's manifest (sha256 of artifacts) and its budgets.
    Exit 0: all budgets hold; 1: a budget failed; 2: bad input.
    """
    if len(targets) == 1 and os.path.isdir(targets[0]):
        if budgets_path:
            raise click.UsageError("give either a run directory or --budgets, not both")
        _check_run_dir(targets[0], as_json)
        return
    if not budgets_path:
        if len(targets) == 1 and ("/" in targets[0] or os.sep in targets[0]):
            raise ToolchainError(f"{targets[0]}: no such run folder")  # a path, not a model name
        raise click.UsageError("give --budgets FILE.yaml (or a single run directory)")

    from toolchain.profile import check_budgets, load_budgets, raise_if_failed

    budgets = load_budgets(budgets_path)
    for name in targets:
        if name not in budgets.subjects:
            from toolchain.models import list_models

            if name in list_models():
                raise ToolchainError(f"no budgets for model {name!r} in {budgets_path}")
            raise ToolchainError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    with _console(stderr=True).status("measuring"):
        results = check_budgets(budgets, targets or None)
    _print_rows(results, as_json, passed=all(r.passed for r in results))
    raise_if_failed(results)
