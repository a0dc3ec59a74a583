"""The real-folder recipe's training on whatever device torch finds (a CUDA GPU when there is one),
then the hypernetwork designs over seeds on the backbone it trained.

    python benchmarks/bench_real_faces_gpu.py --faces ../shared/faces/lfw-train --out OUT
        [--epochs 6] [--seeds 0,1,2] [--variants full,wide,trunk-pretrain] [--amp bf16] [--workers 8]
        [--long-epochs 0]

1. `recipes/verifier-folder.yaml` on FACES (data, backbone, pairs, hypernet, enrollment, evaluation;
   no export), the backbone with `--amp` mixed precision and `--workers` loader processes. Its
   images/s is the backbone stage's steps x batch over the stage's wall time.
2. `toolchain evaluate ablation` on that run's backbone, data and pairs, one process per seed and
   variant (they share the device), the recipe's hypernetwork settings as the base of every variant.
3. With `--long-epochs N`: the same recipe with an N-epoch backbone, its route scored over the seeds
   (the `full` variant), to see whether the route follows a better-trained h_bb.

Writes OUT/summary.json and OUT/summary.md (accuracy / AUC / TAR@FAR=1e-3 as mean +- population std
over the seeds) after each part, so a run stopped at its time limit keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "verifier-folder.yaml"
TRAIN_STAGES = ("data", "train_backbone", "pairs", "train_hypernet", "enroll", "evaluate")


def device_name() -> str:
    from toolchain.environment import cuda_devices, describe_cpu

    gpus = cuda_devices()
    where = f"CUDA {gpus[0]}" if gpus else "CPU"
    return f"{where}, torch {torch.__version__}; host CPU {describe_cpu()}"


def run_recipe_training(faces: Path, out: Path, epochs: int, amp: str, workers: int, overrides: list[str]) -> dict:
    """The recipe's stages up to evaluation; returns the backbone's throughput and the run's scores."""
    from toolchain.console import third_party_log
    from toolchain.models.io import load_state
    from toolchain.pipeline import run_recipe
    from toolchain.pipeline.stages import default_stages
    from toolchain.recipe import load_recipe

    rec = load_recipe(RECIPE, [f"data.root={faces}", f"train.backbone.epochs={epochs}",
                               f"train.backbone.amp={amp}", f"train.backbone.num_workers={workers}", *overrides])
    stages = [s for s in default_stages(rec) if s.name in TRAIN_STAGES]
    with third_party_log(out / "run.log", verbose=False):
        result = run_recipe(rec, out, stages=stages)
    seconds = {r.name: r.seconds for r in result.stages}
    steps = len(load_state(out / "train" / "backbone" / "backbone.pt")["history"])
    batch = rec.train.backbone.batch_size
    manifest = json.loads(result.manifest.read_text())
    return {"epochs": epochs, "amp": amp, "workers": workers, "backbone_steps": steps, "batch": batch,
            "backbone_seconds": seconds["train_backbone"],
            "backbone_images_per_s": steps * batch / seconds["train_backbone"],
            "stage_seconds": seconds, "evaluation": manifest.get("evaluation"),
            "hypernet_config": rec.train.hypernet.model_dump(mode="json")}


def _recipe_hypernet(overrides: list[str]) -> dict:
    from toolchain.recipe import load_recipe

    return load_recipe(RECIPE, ["data.root=.", *overrides]).train.hypernet.model_dump(mode="json")


def run_ablation(run: Path, out: Path, hypernet_config: dict, variants: list[str], seeds: list[int]) -> list[dict]:
    """One `toolchain evaluate ablation` process per seed and variant, all at once (they share the
    device; a run stopped at its time limit keeps every pair that finished); their rows."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "hypernet.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in hypernet_config.items() if k != "seed"}))
    # Each child gets its share of the cores: 9 children at torch's default (every core each) spent
    # 6 minutes loading the images on a 16-core machine; at 2 threads each, 6 children took 2 minutes.
    threads = max(1, (os.cpu_count() or 1) // (len(seeds) * len(variants)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = []
    for seed in seeds:
        for variant in variants:
            name = f"seed{seed}_{variant}"
            cmd = [sys.executable, "-m", "toolchain", "evaluate", "ablation",
                   "--backbone", str(run / "train/backbone/backbone.pt"), "--data", str(run / "data/train.rec"),
                   "--pairs", str(run / "pairs/pairs.bin"), "--variants", variant,
                   "--config", str(config), "--set", f"seed={seed}", "--set", "progress=false", "--out", str(out / name)]
            log = open(out / f"{name}.log", "w")
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log))
    rows = []
    for name, proc, log in procs:
        code = proc.wait()
        log.close()
        path = out / name / "ablation.json"
        if code != 0 or not path.is_file():
            print(f"ablation {name} failed (exit {code}); see {out}/{name}.log", flush=True)
            continue
        rows += json.loads(path.read_text())["rows"]
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and population std over seeds of each variant's per-user and backbone scores."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == variant]

        def stat(get):
            values = np.array([get(r) for r in group], dtype=float)
            return [float(values.mean()), float(values.std())]

        table.append({
            "variant": variant, "seeds": sorted(r["seed"] for r in group),
            "per_user_accuracy": stat(lambda r: 100 * r["per_user_accuracy"]),
            "per_user_auc": stat(lambda r: r["per_user_auc"]),
            "per_user_tar": stat(lambda r: 100 * r["per_user_tar_at_far"]["1e-3"]),
            "symmetric_accuracy": stat(lambda r: 100 * r["symmetric_accuracy"]),
            "trunk_cosine_accuracy": stat(lambda r: 100 * r["trunk_cosine_accuracy"]),
            "backbone_accuracy": stat(lambda r: 100 * r["backbone_accuracy"]),
            "backbone_auc": stat(lambda r: r["backbone_auc"]),
            "train_seconds": stat(lambda r: r["train_seconds"] or 0.0),
        })
    return table


def markdown(summary: dict) -> str:
    lines = [f"device: {summary['device']}", ""]
    for part in ("recipe", "long"):
        run = summary.get(part)
        if summary.get(f"{part}_error"):
            lines += [f"## {part}: failed: {summary[part + '_error']}", ""]
        if run:
            lines += [f"## {part}: backbone {run['epochs']} epochs, {run['backbone_steps']} steps of {run['batch']}, "
                      f"amp {run['amp']}, {run['workers']} workers: {run['backbone_seconds']:.1f} s, "
                      f"{run['backbone_images_per_s']:.0f} images/s", "",
                      "stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in run["stage_seconds"].items()), ""]
        rows = summary.get(f"{part}_ablation") or []
        if rows:
            lines += ["| variant | seeds | per-user acc % | AUC | TAR@1e-3 % | symmetric acc % | trunk cos acc % "
                      "| backbone acc % | backbone AUC | train s |", "|" + "---|" * 10]
            for r in rows:
                def f(key, digits):
                    m, s = r[key]
                    return f"{m:.{digits}f} ± {s:.{digits}f}"
                lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {f('per_user_accuracy', 2)} "
                             f"| {f('per_user_auc', 4)} | {f('per_user_tar', 1)} | {f('symmetric_accuracy', 2)} "
                             f"| {f('trunk_cosine_accuracy', 2)} | {f('backbone_accuracy', 2)} "
                             f"| {f('backbone_auc', 4)} | {f('train_seconds', 0)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, required=True, help="image folder of real faces (one folder per person)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=6, help="backbone epochs of part 1 (the recipe's 6)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="full,wide,trunk-pretrain")
    ap.add_argument("--amp", default="bf16", choices=("off", "bf16", "fp16"))
    ap.add_argument("--workers", type=int, default=8, help="backbone loader processes")
    ap.add_argument("--long-epochs", type=int, default=0, help="part 3's backbone epochs (0: skip part 3)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a further recipe override, e.g. train.hypernet.steps=20 (repeatable)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": device_name(), "faces": str(args.faces), "seeds": seeds}

    def save() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (args.out / "summary.md").write_text(markdown(summary))

    t0 = time.time()
    parts = [("recipe", args.epochs, variants)]
    if args.long_epochs:
        parts.append(("long", args.long_epochs, ["full"]))
    for part, epochs, part_variants in parts:
        run = args.out / f"run_{part}"
        print(f"[{time.time() - t0:.0f} s] {part}: recipe training, backbone {epochs} epochs", flush=True)
        try:
            summary[part] = run_recipe_training(args.faces, run, epochs, args.amp, args.workers, args.overrides)
        except Exception as exc:  # the ablation needs only the trained files: keep going if they exist
            traceback.print_exc()
            summary[f"{part}_error"] = f"{type(exc).__name__}: {exc}"
            if not (run / "pairs" / "pairs.bin").is_file():
                save()
                continue
        save()
        print(f"[{time.time() - t0:.0f} s] {part}: ablation {part_variants} x seeds {seeds}", flush=True)
        base = summary.get(part, {}).get("hypernet_config") or _recipe_hypernet(args.overrides)
        rows = run_ablation(run, args.out / f"ablation_{part}", base, part_variants, seeds)
        summary[f"{part}_ablation"] = summarise(rows)
        summary[f"{part}_ablation_rows"] = rows
        save()
        print(markdown(summary), flush=True)
    print(f"[{time.time() - t0:.0f} s] done", flush=True)


if __name__ == "__main__":
    main()
