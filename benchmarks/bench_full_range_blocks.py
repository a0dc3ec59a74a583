"""Which block's activations want their full range in int8, judged on identity images alone.

    python benchmarks/bench_full_range_blocks.py RECIPE RUN [--seed S] [--others 128] [--out FILE]

RECIPE: the embedding recipe the run used (its `export.int8` calibration settings apply; the
fallback and any float or full-range layers are left out). RUN: its run folder (`toolchain run
RECIPE --out RUN`, or one `seed-N` folder of benchmarks/bench_recipe_seeds.py); reads the float
model RUN/train/backbone/backbone.pt and the identity images RUN/data/train.rec. The pairs that
parity judges are never read.

In torch's reference int8 graph, calibrated as the export calibrates (the recipe's
`calibration_images` drawn with export seed S), every identity image outside the calibration
draw is embedded with its mirror. The tail is the images whose cosine to float falls below the
recipe's `parity.min_embedding_cosine_min`. Then, for each block alone, the graph is built again
with that block's activations at their full min-max range (`export.int8.full_range_layers`), and
the table gives the tail's mean cosine and how many of it stay below the bound, and the mean over
`--others` other images (what the range costs the bulk). A block that lifts the tail without
costing the bulk is a candidate for the recipe's `full_range_layers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolchain.data import load_identity_dataset
from toolchain.errors import ToolchainError
from toolchain.models.io import load_model
from toolchain.quantize.calibration import identity_calibration_indices, identity_calibration_set
from toolchain.quantize.int8_options import Int8Options
from toolchain.quantize.sensitivity import block_names, mirrored_embeddings, reference_int8_graph
from toolchain.recipe import load_recipe

BATCH = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--seed", type=int, default=None, help="export seed (default: the recipe's)")
    ap.add_argument("--others", type=int, default=128, help="images outside the tail to measure the bulk on")
    ap.add_argument("--out", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    console = Console()

    from toolchain.export.api import _exact_input_view

    recipe = load_recipe(args.recipe)
    seed = recipe.seed if args.seed is None else args.seed
    bound = recipe.parity.min_embedding_cosine_min
    if bound is None:
        raise SystemExit(f"{args.recipe}: parity.min_embedding_cosine_min is not set")
    int8 = dataclasses.replace(Int8Options.from_any(recipe.export.int8, "executorch"), fallback=False,
                               float_layers=(), full_range_layers=())
    model, _ = load_model(args.run / "train" / "backbone" / "backbone.pt")
    model, spec = _exact_input_view(model.eval())  # the input view the export quantises
    ds = load_identity_dataset(args.run / "data" / "train.rec")
    n_cal = recipe.export.calibration_images
    calibration = identity_calibration_set(ds, n_cal, seed)
    drawn = set(identity_calibration_indices(len(ds), n_cal, seed).tolist())
    rest = [i for i in range(len(ds)) if i not in drawn]
    images = np.stack([ds.get_uint8(i) for i in rest])

    def cosines(full_range: tuple[str, ...], subset: np.ndarray, ref: np.ndarray) -> np.ndarray:
        graph = reference_int8_graph(model, calibration, dataclasses.replace(int8, full_range_layers=full_range),
                                     BATCH, spec.mean, spec.std)
        return np.sum(mirrored_embeddings(graph, subset, BATCH, spec.mean, spec.std) * ref, 1)  # unit vectors

    t0 = time.perf_counter()
    console.print(f"all int8 ({int8.calibration}), export seed {seed}: embedding {len(images)} identity images ...")
    ref_all = mirrored_embeddings(model, images, BATCH, spec.mean, spec.std)
    base = cosines((), images, ref_all)
    tail = np.where(base < bound)[0]
    if len(tail) == 0:
        console.print(f"no identity image below {bound}: nothing to lift")
        return
    persons = np.asarray(ds.labels)[rest]
    others = np.random.default_rng(0).choice(np.where(base >= bound)[0], min(args.others, int((base >= bound).sum())),
                                             replace=False)
    console.print(f"tail: {len(tail)} of {len(images)} images below {bound} "
                  f"(persons {sorted(set(persons[tail].tolist()))}); {time.perf_counter() - t0:.0f} s")
    subset = np.concatenate([tail, others])
    rows = [{"block": "(none)", "tail_mean": float(base[tail].mean()), "tail_below": int(len(tail)),
             "others_mean": float(base[others].mean())}]
    console.print(f"  (none): tail {base[tail].mean():.5f} ({len(tail)} below), others {base[others].mean():.5f}")
    for block in block_names(model):
        try:
            c = cosines((block,), images[subset], ref_all[subset])
        except ToolchainError:  # a block with no op of its own in the graph (a folded norm, say)
            continue
        ct, co = c[:len(tail)], c[len(tail):]
        rows.append({"block": block, "tail_mean": float(ct.mean()), "tail_below": int((ct < bound).sum()),
                     "others_mean": float(co.mean())})
        console.print(f"  {block}: tail {ct.mean():.5f} ({(ct < bound).sum()} below), others {co.mean():.5f}")
    table = Table(title=f"{recipe.name}, export seed {seed}: one block at its full range "
                        f"(torch's reference int8 graph; {len(tail)} tail images, {len(others)} others)")
    for col in ("full range", "tail mean", "tail below bound", "others mean", "tail gain", "others gain"):
        table.add_column(col, justify="left" if col == "full range" else "right")
    b = rows[0]
    for r in rows:
        table.add_row(r["block"], f"{r['tail_mean']:.5f}", str(r["tail_below"]), f"{r['others_mean']:.5f}",
                      f"{r['tail_mean'] - b['tail_mean']:+.5f}", f"{r['others_mean'] - b['others_mean']:+.5f}")
    console.print(table)
    console.print(f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"recipe": str(args.recipe), "seed": seed, "bound": bound,
                                        "tail_persons": sorted(set(persons[tail].tolist())), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
