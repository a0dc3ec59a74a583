"""Where an int8 file's embedding cosine to float is lowest, by person: the recipe's identity
images (what calibration and the fallback draw from) against its pair images (what parity
judges).

    python benchmarks/bench_int8_tails.py RUN [RUN ...] [--min-cosine 0.99] [--out FILE]

RUN: a recipe run folder of an embedding recipe with synthetic data (`toolchain run
recipes/X.yaml --out RUN`, or one `seed-N` folder of benchmarks/bench_recipe_seeds.py). Reads
RUN/data/train.rec, RUN/data/synthetic.bin with its pair_identities.json, the float model
RUN/train/backbone/backbone.pt and every int8 file in RUN/export. Each image is embedded with its
mirror, as parity does, in the file's own runtime. Prints, per file and image set, the mean, low
quantiles, the images below the bound, and the persons with the lowest cosine; `--out` writes every
per-image cosine as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolchain.data import load_identity_dataset, load_pairs
from toolchain.evaluate.parity import unit_embed
from toolchain.runtime import load_runner

PERSONS_SHOWN = 5


def _image_sets(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"identity": (images, persons), "pairs": (distinct pair images, persons)}."""
    ds = load_identity_dataset(run / "data" / "train.rec")
    pairs = load_pairs(run / "data" / "synthetic.bin")
    images, ia, ib = pairs.distinct()
    persons = pairs.distinct_identities(ia, ib, len(images))
    if persons is None:
        raise SystemExit(f"{run}: the pairs have no pair_identities.json beside them")
    return {"identity": (np.stack([ds.get_uint8(i) for i in range(len(ds))]), np.asarray(ds.labels)),
            "pairs": (images, persons)}


def _row(name: str, cos: np.ndarray, persons: np.ndarray, bound: float) -> list[str]:
    people = np.unique(persons)
    worst = sorted((float(cos[persons == p].min()), int(p), int(np.sum(cos[persons == p] < bound)),
                    int(np.sum(persons == p))) for p in people)[:PERSONS_SHOWN]
    below = cos < bound
    return [name, f"{len(cos):,}", f"{cos.mean():.5f}", f"{np.quantile(cos, 0.01):.4f}", f"{cos.min():.4f}",
            f"{int(below.sum())} ({below.mean() * 100:.2f}%), {len(np.unique(persons[below]))} persons",
            ", ".join(f"{p}: {m:.4f} ({n}/{k})" for m, p, n, k in worst)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--min-cosine", type=float, default=0.99, help="the parity bound on the minimum cosine")
    ap.add_argument("--out", type=Path, help="JSON of every per-image cosine")
    args = ap.parse_args()
    console, dump = Console(width=200), {}
    for run in args.runs:
        sets = _image_sets(run)
        ref = load_runner(run / "train" / "backbone" / "backbone.pt")
        floats = {k: unit_embed(ref, images) for k, (images, _) in sets.items()}
        table = Table(title=f"{run}: embedding cosine to float of each image (with its mirror)")
        for col in ("file / images", "n", "mean", "1% quantile", "min", f"below {args.min_cosine}",
                    f"lowest {PERSONS_SHOWN} persons: min (images below / of)"):
            table.add_column(col)
        for path in sorted((run / "export").glob("*int8*")):
            runner = load_runner(path)
            for k, (images, persons) in sets.items():
                cos = np.sum(unit_embed(runner, images) * floats[k], axis=1)
                table.add_row(*_row(f"{path.name} / {k}", cos, persons, args.min_cosine))
                dump.setdefault(str(run), {}).setdefault(path.name, {})[k] = {
                    "cosine": cos.round(6).tolist(), "person": persons.tolist()}
        console.print(table)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(dump))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
