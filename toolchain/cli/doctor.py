"""`toolchain doctor`: one table that says whether this environment runs a recipe."""

from __future__ import annotations

import click

from toolchain.errors import CheckFailed


@click.command("doctor")
@click.option("--artifacts", "artifacts_dir", type=click.Path(file_okay=False), default="artifacts",
              show_default=True, help="Where runs write (its free disk space is checked).")
@click.option("--skip-runtimes", is_flag=True, help="Skip converting and running the tiny models (a few seconds).")
@click.pass_context
def doctor(ctx: click.Context, artifacts_dir: str, skip_runtimes: bool) -> None:
    """Check Python and the pinned stack, that ExecuTorch, LiteRT and onnx2tf run a tiny model,
    the CPU's int8 features, CUDA devices and free disk. Exit 0 when a recipe can run, 1 with
    what failed and how to fix it otherwise."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from toolchain.console import third_party_log
    from toolchain.doctor import passed, run_checks

    log = Path(artifacts_dir) / "doctor.log"
    with third_party_log(log, verbose=ctx.obj.get("verbose", False)):
        checks = run_checks(artifacts_dir, runtimes=not skip_runtimes)
        table = Table(title="toolchain doctor")
        for col in ("check", "status", "found", "fix"):
            table.add_column(col)
        style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
        for c in checks:
            table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", c.found, c.fix)
        Console(width=None if __import__("sys").stdout.isatty() else 160).print(table)
    if not passed(checks):
        failed = [c.name for c in checks if c.status == "fail"]
        raise CheckFailed(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)} (details: {log})")
    click.echo("doctor: this environment runs the recipes")
