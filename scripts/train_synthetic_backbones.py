"""The backbone recipes' starting checkpoints: each zoo backbone trained on many synthetic identities
(on a GPU when torch finds one), then scored on its recipe's own 1,200 held-out pairs.

    python scripts/train_synthetic_backbones.py --out OUT [--models mobilefacenet,seesawfacenet,vargfacenet]
        [--identities 10000] [--images-per-identity 12] [--seconds 320] [--batch 256] [--workers 4]

1. `toolchain data synth --seed 1`: a training set drawn with another seed than the recipes' data
   (seed 0), so none of the recipes' held-out identities or look-alike families is in it.
2. `toolchain train backbone` for every model at once (they share the device and the cores), each
   with the recipe's model, embedding size and model arguments, bf16 autocast, and a time budget
   of `--seconds` that the cosine schedule follows (the step count depends on the machine; each
   checkpoint records its own, and `--seconds 0 --max-steps N` trains a fixed N steps instead).
3. OUT/<model>.pt: the final weights in float16 (half the bytes; the recipes load them into the
   float32 model, so these rounded weights are the float model), with the training config, steps,
   seconds and data set.
4. The recipe's data and backbone stages (`init` = that file, `max_steps` 0), then the float model
   scored as the recipe's evaluation scores it (image + mirror embeddings, cosine, 10 folds) on the
   recipe's pairs; and how many pairs lie within 0.01 of its best threshold, with the int8 score
   noise the agreement bound allows there (toolchain.evaluate.flips).

Writes OUT/summary.json and OUT/summary.md. Copy OUT/<model>.pt to recipes/checkpoints/ to ship it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA_SEED = 1  # the recipes' synthetic data use seed 0: another seed draws other identities and families


def device_name() -> str:
    from toolchain.environment import cuda_devices, describe_cpu

    gpus = cuda_devices()
    return f"{f'CUDA {gpus[0]}' if gpus else 'CPU'}, torch {torch.__version__}; host CPU {describe_cpu()}"


def synth(out: Path, identities: int, images: int, workers: int) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "toolchain", "data", "synth", "--out", str(out), "--format", "insightface",
                    "--seed", str(DATA_SEED), "--identities", str(identities), "--images-per-identity", str(images),
                    "--pairs", "20", "--workers", str(workers), "--overwrite"], check=True, cwd=ROOT)
    return time.time() - t0


def train_all(models: list[str], data: Path, out: Path, args) -> dict[str, dict]:
    """One `toolchain train backbone` per model, all at once; each gets its share of the cores."""
    threads = max(1, (os.cpu_count() or 1) // len(models) - args.workers)
    procs = {}
    for model in models:
        recipe = yaml.safe_load((ROOT / "recipes" / f"{model}.yaml").read_text())["train"]["backbone"]
        config = {"model": model, "embedding_size": recipe["embedding_size"],
                  "model_kwargs": recipe.get("model_kwargs", {}), "batch_size": args.batch, "lr": args.lr,
                  "warmup_steps": args.warmup, "max_steps": args.max_steps, "max_seconds": args.seconds or None,
                  "amp": args.amp, "num_workers": args.workers, "checkpoint_every": 500, "progress": False}
        (out / f"{model}.yaml").write_text(yaml.safe_dump(config))
        log = open(out / f"{model}.log", "w")
        cmd = [sys.executable, "-m", "toolchain", "train", "backbone", "--data", str(data),
               "--out", str(out / model), "--config", str(out / f"{model}.yaml"), "--no-resume"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs[model] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log, time.time())
    done = {}
    for model, (proc, log, t0) in procs.items():
        code = proc.wait()
        log.close()
        done[model] = {"exit": code, "wall_seconds": time.time() - t0}
    return done


def compact(model: str, trained: Path, target: Path, data: dict) -> dict:
    """The final weights in float16 (integer buffers as they are), with what made them."""
    from toolchain.models.io import load_state, save_checkpoint

    state = load_state(trained)
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in state["state_dict"].items()}
    info = {"config": state["config"], "step": state["step"], "seconds": state.get("elapsed"),
            "final_loss": float(np.mean(state["history"][-50:])) if state["history"] else None,
            "data": data, "device": device_name(), "weights": "float16"}
    save_checkpoint(target, model, state["model_kwargs"], weights, **info)
    return {k: v for k, v in info.items() if k != "config"} | {"bytes": target.stat().st_size}


def score_on_recipe(model: str, checkpoint: Path, out: Path) -> dict:
    """The recipe's data and backbone stages (the checkpoint, no steps); its float scores on the pairs."""
    from toolchain.console import third_party_log
    from toolchain.data.insightface_bin import read_bin
    from toolchain.evaluate.flips import allowed_flips, noise_budget
    from toolchain.evaluate.metrics import _best_threshold, verification_metrics
    from toolchain.evaluate.parity import pair_scores
    from toolchain.pipeline import run_recipe
    from toolchain.pipeline.stages import default_stages
    from toolchain.recipe import load_recipe
    from toolchain.runtime import load_runner

    rec = load_recipe(ROOT / "recipes" / f"{model}.yaml",
                      [f"train.backbone.init={checkpoint.resolve()}", "train.backbone.max_steps=0"])
    stages = [s for s in default_stages(rec) if s.name in ("data", "train_backbone")]
    with third_party_log(out / "run.log", verbose=False):
        run_recipe(rec, out, stages=stages)
    pairs = read_bin(out / "data" / "synthetic.bin")
    scores, _, _ = pair_scores(load_runner(out / "train" / "backbone" / "backbone.pt"), pairs)
    issame = np.asarray(pairs.issame, bool)
    evaluation = verification_metrics(scores, issame)
    threshold, _ = _best_threshold(scores, issame)
    allowed = allowed_flips(len(scores), rec.parity.min_decision_agreement)
    return {"accuracy": float(evaluation["accuracy"]), "auc": float(evaluation["auc"]), "pairs": len(scores),
            "pairs_within_0.01": int((np.abs(scores - threshold) < 0.01).sum()),
            "noise_budget": noise_budget(scores, threshold, allowed), "allowed_flips": allowed}


def markdown(summary: dict) -> str:
    lines = [f"device: {summary['device']}", f"data: {summary['data']}", "",
             "| model | steps | train s | final loss | float acc % | AUC | pairs within 0.01 | noise budget | MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, row in summary["models"].items():
        ck, sc = row.get("checkpoint", {}), row.get("score", {})
        acc = sc.get("accuracy")
        lines.append(f"| {model} | {ck.get('step', '')} | {ck.get('seconds') or 0:.0f} | {ck.get('final_loss') or 0:.3f} "
                     f"| {'' if acc is None else f'{100 * acc:.2f}'} | {sc.get('auc') or 0:.4f} "
                     f"| {sc.get('pairs_within_0.01', '')} | {sc.get('noise_budget') or 0:.4f} "
                     f"| {ck.get('bytes', 0) / 1e6:.1f} |" + (f" {row['error']}" if row.get("error") else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="mobilefacenet,seesawfacenet,vargfacenet")
    ap.add_argument("--identities", type=int, default=10000)
    ap.add_argument("--images-per-identity", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=320.0, help="each model's training time (0: none, "
                    "--max-steps alone sets the schedule, e.g. a shipped checkpoint's step count)")
    ap.add_argument("--max-steps", type=int, default=100_000, help="the schedule's length if time never ends it")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--amp", default="bf16", choices=("off", "bf16", "fp16"))
    ap.add_argument("--workers", type=int, default=4, help="loader processes per model")
    args = ap.parse_args()
    models = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    summary: dict = {"device": device_name(), "models": {m: {} for m in models},
                     "data": {"seed": DATA_SEED, "identities": args.identities,
                              "images_per_identity": args.images_per_identity}}

    def save() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (args.out / "summary.md").write_text(markdown(summary))

    t0 = time.time()
    summary["data"]["seconds"] = synth(data, args.identities, args.images_per_identity, os.cpu_count() or 1)
    print(f"[{time.time() - t0:.0f} s] data: {summary['data']}", flush=True)
    save()
    for model, row in train_all(models, data, args.out, args).items():
        summary["models"][model]["train"] = row
        print(f"[{time.time() - t0:.0f} s] {model}: {row}", flush=True)
    for model in models:
        entry = summary["models"][model]
        trained = args.out / model / "backbone.pt"
        if not trained.is_file():
            entry["error"] = f"no checkpoint (exit {entry['train']['exit']}; see {model}.log)"
            continue
        entry["checkpoint"] = compact(model, trained, args.out / f"{model}.pt", summary["data"])
        save()
    for model in models:
        entry = summary["models"][model]
        if "checkpoint" in entry:
            try:
                entry["score"] = score_on_recipe(model, args.out / f"{model}.pt", args.out / f"recipe_{model}")
            except Exception as exc:  # noqa: BLE001 - keep the other models' rows
                entry["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
            print(f"[{time.time() - t0:.0f} s] {model}: {entry.get('score') or entry.get('error')}", flush=True)
            save()
    print(markdown(summary))


if __name__ == "__main__":
    main()
