"""How well the fallback's ranking predicts what a block in float does for the score noise.

    python benchmarks/bench_fallback_ranking.py RECIPE RUN [--seed S] [--held-out 512] [--out FILE]

RECIPE: an embedding recipe with `fallback_unit: block`; RUN: its run folder (`toolchain run
RECIPE --out RUN`, or one `seed-N` folder of benchmarks/bench_recipe_seeds.py), which has the
float model (RUN/train/backbone/backbone.pt), the identity images (RUN/data/train.rec) and the
agreement target's threshold (RUN/manifest.json, `int8_recovery.agreement_target`).

In torch's reference int8 graph of the `.pte` (calibrated as the export calibrates, export seed
S), each block alone is kept in float, and its embeddings of three sets of identity images, each
image with its mirror, are compared with float: the fallback's 32 ranking images, its 128
measuring images (toolchain.quantize.recovery), and `--held-out` others outside those and the
calibration draw. For each set: the mean cosine to float (after setting aside the lowest 2%, as
the fallback does) and the score noise at the threshold (toolchain.evaluate.flips.score_noise_at).
The held-out noise stands for what parity will measure; the table ends with the Spearman rank
correlation of each ranking with it (toolchain.quantize.selection.ranks_on_all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from toolchain.console import progress_bar
from toolchain.data import load_identity_dataset
from toolchain.evaluate.flips import score_noise_at
from toolchain.models.io import load_model
from toolchain.quantize.calibration import identity_calibration_indices, identity_calibration_set
from toolchain.quantize.int8_options import Int8Options
from toolchain.quantize.recovery import _measuring_indices
from toolchain.quantize.selection import cosine_summary, ranking_indices
from toolchain.quantize.sensitivity import (_float_units, _in_blocks, block_names, mirrored_embeddings,
                                            reference_int8_graph)
from toolchain.recipe import load_recipe

BATCH = 16
SETS = ("ranking", "measuring", "held-out")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--seed", type=int, default=None, help="export seed (default: the run's)")
    ap.add_argument("--held-out", type=int, default=512, help="identity images outside the fallback's")
    ap.add_argument("--out", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 200)  # a log keeps every column

    from toolchain.export.api import _exact_input_view

    manifest = json.loads((args.run / "manifest.json").read_text())
    aim = (manifest.get("int8_recovery") or {}).get("agreement_target")
    if not aim:
        raise SystemExit(f"{args.run}: the run has no agreement target (int8_recovery.agreement_target)")
    threshold = float(aim["score_threshold"])
    recipe = load_recipe(args.recipe)
    seed = int(manifest["recipe"]["seed"]) if args.seed is None else args.seed
    int8 = dataclasses.replace(Int8Options.from_any(recipe.export.int8, "executorch"), fallback=False,
                               float_layers=())
    model, _ = load_model(args.run / "train" / "backbone" / "backbone.pt")
    model, spec = _exact_input_view(model.eval())  # the input view the export quantises
    ds = load_identity_dataset(args.run / "data" / "train.rec")
    n_cal = recipe.export.calibration_images
    calibration = identity_calibration_set(ds, n_cal, seed)
    measuring = _measuring_indices(len(ds), seed)
    taken = set(measuring.tolist()) | set(identity_calibration_indices(len(ds), n_cal, seed).tolist())
    rest = np.array([i for i in range(len(ds)) if i not in taken])
    held_out = np.sort(np.random.default_rng(0).choice(rest, min(args.held_out, len(rest)), replace=False))
    order = np.concatenate([measuring, held_out])
    images = np.stack([ds.get_uint8(int(i)) for i in order])
    where = {"ranking": ranking_indices(len(measuring)), "measuring": np.arange(len(measuring)),
             "held-out": np.arange(len(measuring), len(order))}

    t0 = time.perf_counter()
    ref = mirrored_embeddings(model, images, BATCH, spec.mean, spec.std)
    graph = reference_int8_graph(model, calibration, int8, BATCH, spec.mean, spec.std)

    def row(name: str, g) -> dict:
        e = mirrored_embeddings(g, images, BATCH, spec.mean, spec.std)
        out = {"block": name}
        for s, idx in where.items():
            out[f"cosine {s}"] = cosine_summary(np.sum(e[idx] * ref[idx], 1))["cosine_mean"]
            out[f"noise {s}"] = score_noise_at(e[idx], ref[idx], threshold)
        return out

    nodes = list(graph.graph.nodes)
    blocks = [b for b in block_names(model) if any(_in_blocks(n, [b]) for n in nodes)]
    rows = [row("(all int8)", graph)]
    with progress_bar(f"{len(blocks)} blocks, one at a time in float", len(blocks)) as advance:
        for b in blocks:
            with _float_units(graph, [b], "block") as g:
                rows.append(row(b, g))
            advance(1)

    table = Table(title=f"{recipe.name}, export seed {seed}: one block in float, torch's reference int8 graph; "
                        f"score noise at {threshold:.3f}; {len(where['ranking'])} ranking, {len(measuring)} "
                        f"measuring and {len(held_out)} held-out identity images")
    table.add_column("block")
    for s in SETS:
        table.add_column(f"cosine, {s}", justify="right")
        table.add_column(f"noise, {s}", justify="right")
    for r in rows:
        table.add_row(r["block"], *(f"{r[f'{k} {s}']:.5f}" for s in SETS for k in ("cosine", "noise")))
    console.print(table)
    truth = [r["noise held-out"] for r in rows[1:]]
    correlations = {}
    for s in SETS[:2]:
        for k, sign in (("cosine", -1.0), ("noise", 1.0)):
            ranked = [sign * r[f"{k} {s}"] for r in rows[1:]]
            correlations[f"{k} {s}"] = float(spearmanr(ranked, truth).correlation)
            top = [rows[1:][i]["block"] for i in np.argsort(ranked)[:3]]
            console.print(f"ranked by the {k} on the {s} images: Spearman {correlations[f'{k} {s}']:.2f} with the "
                          f"held-out noise; first three {', '.join(top)}")
    best = [rows[1:][i]["block"] for i in np.argsort(truth)[:3]]
    console.print(f"by the held-out noise: {', '.join(best)}; {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"recipe": str(args.recipe), "seed": seed, "threshold": threshold,
                                        "rows": rows, "spearman": correlations}, indent=1))


if __name__ == "__main__":
    main()
