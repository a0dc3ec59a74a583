"""A recipe run with several seeds: its float accuracy and each file's parity as mean ± std.

    python benchmarks/bench_recipe_seeds.py RECIPE [OVERRIDES...] [--out DIR] [--seeds 0 1 2]

(Overrides go before `--seeds`, which takes every number after it.)

Runs `toolchain run RECIPE --out DIR/seed-S seed=S train.<part>.seed=S OVERRIDES` for each seed,
one after the other, each in its own process (its stages and progress show as it runs): every
seed is a whole run, and its exit code is the recipe's. The seed is the training seed and the export seed (calibration images, QAT batches);
the data and its pairs stay the recipe's. A folder that already holds a run resumes it: the
pipeline skips stages whose inputs did not change, so a finished seed costs only its checks.

Prints one row per seed and mean ± sample std over the seeds (toolchain.report.seeds), with the
CPU, and writes DIR/seeds.json and DIR/seeds.png (each file's agreement, one dot per seed).
Exit 0 when every seed ran (whatever its verdict), 2 on a bad recipe, 1 when a run broke.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from toolchain.atomic import write_json_atomic
from toolchain.environment import describe_cpu
from toolchain.errors import ToolchainError
from toolchain.recipe import load_recipe
from toolchain.report.plots import seed_agreement
from toolchain.report.seeds import seed_table, summarize_seeds


def seed_overrides(recipe, seed: int) -> list[str]:
    """The overrides that set every seed of `recipe`'s runs: the top-level one (export) and each
    configured training part's."""
    parts = [name for name in ("backbone", "hypernet") if getattr(recipe.train, name, None) is not None]
    return [f"seed={seed}", *(f"train.{name}.seed={seed}" for name in parts)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value, as for `toolchain run`")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, help="folder of the runs (default: artifacts/<recipe>-seeds)")
    args = ap.parse_intermixed_args()  # overrides may come before or after the options
    console = Console(width=190)
    try:
        if any(o.split("=", 1)[0] == "seed" or o.split("=", 1)[0].endswith(".seed") for o in args.overrides):
            raise ToolchainError("the seeds come from --seeds; drop the seed overrides")
        if len(set(args.seeds)) != len(args.seeds):
            raise ToolchainError(f"--seeds repeats a seed: {args.seeds}")
        recipe = load_recipe(args.recipe, args.overrides)
    except ToolchainError as exc:
        console.print(f"error: {exc}")
        return 2
    out = args.out or Path("artifacts") / f"{recipe.name}-seeds"
    out.mkdir(parents=True, exist_ok=True)
    manifests, exits, walls = {}, {}, {}
    for seed in args.seeds:
        run_dir = out / f"seed-{seed}"
        cmd = [sys.executable, "-m", "toolchain", "run", args.recipe, "--out", str(run_dir),
               *seed_overrides(recipe, seed), *args.overrides]
        console.print(f"seed {seed}: {' '.join(cmd[1:])}", markup=False)  # overrides hold [lists]
        start = time.perf_counter()
        exits[seed] = subprocess.run(cmd).returncode  # its stages and progress bars show as it runs
        walls[seed] = time.perf_counter() - start
        console.print(f"seed {seed}: exit {exits[seed]} in {walls[seed]:.0f} s")
        if exits[seed] == 2:
            console.print(f"error: seed {seed}: the recipe was refused; see above")
            return 2
        if exits[seed] not in (0, 1) or not (run_dir / "manifest.json").is_file():
            console.print(f"error: seed {seed}: the run broke (exit {exits[seed]}); see {run_dir / 'run.log'}")
            return 1
        manifests[seed] = json.loads((run_dir / "manifest.json").read_text())

    summary = summarize_seeds(manifests)
    summary |= {"cpu": describe_cpu(), "exit_codes": exits, "wall_s": walls, "overrides": args.overrides}
    console.print(seed_table(summary))
    write_json_atomic(out / "seeds.json", summary)
    seed_agreement(summary, recipe.parity.min_decision_agreement, out / "seeds.png")
    console.print(f"wrote {out / 'seeds.json'} and {out / 'seeds.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
