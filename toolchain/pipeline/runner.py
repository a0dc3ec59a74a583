"""`run_recipe`: the recipe's stages, then the report, then the manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from toolchain.console import own_stderr
from toolchain.pipeline.core import Pipeline, RunContext, Stage, StageOutput, StageReport
from toolchain.pipeline.manifest import manifest_core, write_manifest
from toolchain.recipe import Recipe


@dataclass
class RunResult:
    out_dir: Path
    manifest: Path
    report_md: Path
    report_html: Path
    passed: bool
    failures: list[str]
    stages: list[StageReport] = field(default_factory=list)


def _report_stage(after: tuple[str, ...]) -> Stage:
    def run(ctx: RunContext) -> StageOutput:
        from toolchain.report import write_report

        scores = None
        scores_rel = ctx.results.get("parity", {}).get("scores")
        if scores_rel:
            scores = json.loads(ctx.path(scores_rel).read_text())
        written = write_report(manifest_core(ctx), ctx.out_dir, scores)
        return StageOutput(files=written, data={"files": [ctx.rel(p) for p in written]})

    # Keyed on everything the report shows (the manifest minus per-invocation facts), and on
    # every earlier stage's files: unchanged results -> the report is not redrawn.
    return Stage(name="report", title="report", run=run, after=after, config=manifest_core)


def run_recipe(recipe: Recipe, out_dir: str | Path, stages: Optional[list[Stage]] = None,
               console: Optional[Console] = None) -> RunResult:
    """Run a recipe into `out_dir`; cached stages are skipped. Writes report and manifest.

    `stages` replaces the recipe's default stages (tests use stand-ins); the report stage is
    always appended. Returns a RunResult; the caller decides the exit code from `.passed`.
    """
    # Absolute, so stage outputs given as paths under it never get the folder prefixed twice.
    out_dir = Path(out_dir).resolve()
    if stages is None:
        from toolchain.pipeline.stages import default_stages

        stages = default_stages(recipe)
    stages = list(stages)
    stages.append(_report_stage(tuple(s.name for s in stages)))
    console = console or Console(file=own_stderr)
    pipe = Pipeline(stages, recipe, out_dir, console)
    reports = pipe.run()
    core = manifest_core(pipe.ctx)
    manifest_path = write_manifest(out_dir, core, reports, extra={
        "report": {"markdown": "report.md", "html": "report.html"}})
    _summary(console, reports)
    return RunResult(out_dir, manifest_path, out_dir / "report.md", out_dir / "report.html",
                     core["passed"], core["failures"], reports)


def _summary(console: Console, reports: list[StageReport]) -> None:
    table = Table(title="stages", show_edge=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for r in reports:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}")
    console.print(table)
