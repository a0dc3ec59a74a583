"""`toolchain run RECIPE [--out DIR] [key=value ...]`: a recipe end to end."""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.errors import CheckFailed


@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder (default: artifacts/<recipe name>). Rerunning into it skips unchanged stages.")
def run(recipe: Path, overrides: tuple[str, ...], out_dir: Path | None) -> None:
    """Run RECIPE: data, training, enrollment, evaluation, export, budgets, parity, report.

    OVERRIDES are `dotted.key=value` pairs (values parsed as YAML), validated like the recipe,
    e.g. `data.root=/data/faces_emore` or `train.backbone.epochs=2`.

    Exit 0 when every budget and parity bound holds, 1 when one fails (the report is still
    written), 2 on a bad recipe or input.
    """
    from toolchain.console import third_party_log
    from toolchain.pipeline import run_recipe
    from toolchain.pipeline.stages import check_recipe_inputs
    from toolchain.recipe import load_recipe

    rec = load_recipe(recipe, overrides)
    check_recipe_inputs(rec)  # a bad model, checkpoint or module name exits 2 before the run folder is made
    out = out_dir if out_dir is not None else Path("artifacts") / rec.name
    # The libraries' own output (TensorFlow, onnx2tf, ExecuTorch, LiteRT) goes to DIR/run.log.
    verbose = bool((click.get_current_context().find_root().obj or {}).get("verbose"))
    with third_party_log(out / "run.log", verbose=verbose):
        result = run_recipe(rec, out)
    click.echo(f"report: {result.report_md} (html: {result.report_html})")
    click.echo(f"manifest: {result.manifest}")
    if not result.passed:
        raise CheckFailed(f"{len(result.failures)} check(s) failed: " + "; ".join(result.failures)
                          + f" (see {result.report_md})")
