"""`toolchain data`: generate the synthetic data set; inspect any supported data path."""

from __future__ import annotations

import json
import os

from toolchain.console import own_stderr
import click

from toolchain.cli.common import FiniteFloatRange, logged


@click.group()
def data() -> None:
    """Synthetic face data and readers of the insightface / LFW / folder formats."""


@data.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--identities", type=click.IntRange(min=1), default=400, show_default=True,
              help="Training identities (0..N-1).")
@click.option("--images-per-identity", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["folder", "insightface"]), default="folder", show_default=True,
              help="folder: train/<id>/*.jpg + verify/ + pairs.tsv; insightface: train.rec/.idx/property + "
                   "synthetic.bin.")
@click.option("--val-identities", type=click.IntRange(min=2), default=None,
              help="Held-out identities for the verification pairs, starting at the next family boundary "
                   "after the training identities [default: max(2 families, N/4 rounded up to families)].")
@click.option("--val-images-per-identity", type=click.IntRange(min=2), default=None,
              help="Images per held-out identity [default: max(2, images-per-identity)].")
@click.option("--pairs", type=click.IntRange(min=20), default=None,
              help="Verification pairs, a multiple of 20 (10 folds, half matched) "
                   "[default: 3 per held-out image, at most 3000].")
@click.option("--family-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Identities per look-alike family.")
@click.option("--hard-negatives", type=FiniteFloatRange(0, 1), default=0.5, show_default=True,
              help="Fraction of mismatched pairs drawn from one family.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Rendering processes [default: CPU count, at most 4]. Output does not depend on it.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@logged("data.log", None)  # OUT must be new: the log goes to artifacts/logs
def synth(out_dir, identities, images_per_identity, seed, fmt, val_identities, val_images_per_identity, pairs,
          family_size, hard_negatives, workers, overwrite) -> None:
    """Generate the synthetic face data set into OUT (deterministic by --seed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from toolchain.data.writers import benchmark_for, total_images, write_benchmark

    bench = benchmark_for(identities, images_per_identity, seed, val_identities=val_identities,
                          val_images_per_identity=val_images_per_identity, pairs=pairs, family_size=family_size,
                          hard_negative_fraction=hard_negatives)
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    console = Console(file=own_stderr)
    with Progress(TextColumn("rendering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:  # no stray blank line in logs
        task = bar.add_task("render", total=total_images(bench))
        summary = write_benchmark(out_dir, bench, fmt, workers=workers, overwrite=overwrite,
                                  progress=lambda n: bar.advance(task, n))
    click.echo(f"wrote {summary['train_images']} training images ({identities} identities) and "
               f"{summary['pairs']} held-out pairs ({summary['val_identities']} identities from "
               f"{summary['val_offset']}) to {out_dir} [{fmt}]")


@data.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--max-images", type=click.IntRange(min=0), default=None,
              help="Decode at most this many images (default: all).")
def inspect(path, as_json, max_images) -> None:
    """Print identities, images, pairs and image size of PATH, checking every record and image.

    PATH: an insightface .bin, a RecordIO folder or .rec, an image folder (one folder per
    identity, or the synthetic folder layout with pairs.tsv), an LFW root or its pairs.txt.
    Malformed input exits 2 with a one-line reason.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from toolchain.data.inspect import inspect_path

    err = Console(file=own_stderr)
    with Progress(TextColumn("checking images"), BarColumn(), TextColumn("{task.completed}"), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("check", total=None)
        info = inspect_path(path, max_images=max_images, progress=lambda n: bar.advance(task, n))
    if as_json:
        click.echo(json.dumps(info))
        return
    table = Table(title=str(path), show_header=False)
    for key in ("format", "identities", "images", "pairs", "matched_pairs", "image_size", "images_decoded"):
        value = info.get(key)
        table.add_row(key.replace("_", " "), "-" if value is None else str(value))
    Console().print(table)
