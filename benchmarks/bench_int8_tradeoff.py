"""The int8 trade-off of a trained backbone: each accuracy-recovery method's parity and speed.

    python benchmarks/bench_int8_tradeoff.py RUN [--out DIR] [--format executorch|tflite]
        [--qat-steps 200] [--float-layers 4,16] [--repeats 50] [--rounds 5] [--reuse]

RUN: a recipe run folder of the embedding route (`toolchain run recipes/mobilefacenet.yaml`):
its trained model (train/backbone/backbone.pt), identity images (data/train.rec) and held-out
pairs (data/synthetic.bin). For each method the model is exported to an int8 ExecuTorch `.pte`
(or, with `--format tflite`, an int8 onnx2tf `.tflite`) with `export_model`, the recipe's own
path, on the recipe's 64 calibration images (drawn as the pipeline draws them, seed 0); then, in
one run:
- parity in the runtime on the pairs against the float model (`run_parity`): decision agreement
  and flipped decisions, accuracy and TAR@FAR=1e-3 drops, embedding cosine mean / min, and the
  score noise: the std over the pairs of (int8 score - float score). Flips are a small count
  (each pair near the threshold flips or not); the score noise is what drives them, and is far
  less noisy from one export to the next;
- in-runtime latency (ExecuTorch's ETDump; LiteRT's `invoke()` for a `.tflite`), every file and
  the fp32 file of the same format taken in turn in each round (`interleaved_latency`), and the
  int8 / fp32 ratio.
Methods: the three calibration methods, bias correction, equalization, equalization with QAT,
and the same with the K layers the fallback ranks most sensitive kept in float (the ranking of
`toolchain.quantize.sensitivity`, read from the QAT export's manifest; `.pte` only, as the
fallback is: onnx2tf's tensor names do not name the torch layer). With `--format tflite`, bias
correction is the `.tflite`'s own, measured on its int8 graph in LiteRT
(toolchain.export.tflite_bias_correction). Issue 12's bounds are
the recipe's (`parity` section): a row passes when all of them hold. The table is printed, and
written with a plot of agreement against the latency ratio to DIR (tradeoff.json, tradeoff.png).
`--reuse` keeps the files a previous run left in DIR and measures again (e.g. on quieter cores).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolchain.atomic import write_json_atomic
from toolchain.data import load_identity_dataset
from toolchain.environment import cpu_facts, describe_cpu
from toolchain.evaluate.parity import ParityBounds, run_parity
from toolchain.export import export_model
from toolchain.export.bench import interleaved_latency
from toolchain.quantize.calibration import identity_calibration_set
from toolchain.runtime.manifest import MANIFEST_NAME, read_manifest

BOUNDS = {"max_accuracy_drop": 0.3, "min_decision_agreement": 99.5, "max_tar_drop": 1.0,
          "min_embedding_cosine_mean": 0.999, "min_embedding_cosine_min": 0.99}  # issue 12, the recipes'
CALIBRATION_IMAGES = 64  # the backbone recipes' export.calibration_images


def methods(qat_steps: int) -> list[tuple[str, dict]]:
    qat = {"equalize": True, "qat_steps": qat_steps}
    return [("min-max", {"calibration": "minmax"}),
            ("percentile 99.99", {"calibration": "percentile"}),
            ("mse", {}),
            ("mse, bias correction", {"bias_correction": True}),
            ("mse, equalize", {"equalize": True})] + \
        ([(f"mse, equalize, QAT {qat_steps}", qat)] if qat_steps else [])


def export_file(run: Path, out: Path, int8: dict, calib: np.ndarray, identity: np.ndarray | None,
                fallback_targets: dict | None = None, reuse: bool = False, precision: str = "int8",
                fmt: str = "executorch") -> Path:
    if reuse and (out / MANIFEST_NAME).is_file():
        return out / read_manifest(out)["artifacts"][0]["file"]
    if out.exists():
        shutil.rmtree(out)
    records = export_model(run / "train/backbone/backbone.pt", out, [fmt], [precision], calib,
                           calibration_size=len(calib), int8=int8, identity_images=identity,
                           fallback_targets=fallback_targets)
    return Path(records[0].path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench_int8_tradeoff"))
    ap.add_argument("--format", default="executorch", choices=["executorch", "tflite"],
                    help="the int8 file each method makes (the fallback rows are .pte only)")
    ap.add_argument("--qat-steps", type=int, default=200, help="0: no QAT row (nor the fallback's)")
    ap.add_argument("--float-layers", default="4,16", help="comma-separated K: rows with the K most sensitive "
                                                           "layers in float, after equalization and QAT")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reuse", action="store_true", help="keep the files a previous run left in --out")
    args = ap.parse_args()
    run, out = args.run, args.out
    for need in ("train/backbone/backbone.pt", "data/train.rec", "data/synthetic.bin"):
        if not (run / need).is_file():
            raise SystemExit(f"error: {run / need} is missing (a run of recipes/mobilefacenet.yaml or the like)")
    ds = load_identity_dataset(run / "data/train.rec")
    calib = identity_calibration_set(ds, CALIBRATION_IMAGES, seed=0)
    identity = np.stack([ds.get_uint8(i) for i in range(len(ds))])
    out.mkdir(parents=True, exist_ok=True)

    files: dict[str, Path] = {}
    float_layers: dict[str, list[str]] = {}
    reuse = args.reuse  # every export below
    fmt = args.format
    fp32 = export_file(run, out / "fp32", {}, calib, None, reuse=reuse, precision="fp32", fmt=fmt)
    for name, int8 in methods(args.qat_steps):
        slug = out / name.replace(", ", "_").replace(" ", "-")
        if int8.get("qat_steps") and fmt == "executorch":
            # The fallback with a target no file meets (mean cosine 1) ranks every layer and keeps
            # none: the file is all int8, and its manifest holds the ranking for the rows below.
            files[name] = export_file(run, slug, int8 | {"fallback": True, "max_float_layers": 1}, calib, identity,
                                      {"min_cosine_mean": 1.0}, reuse)
            ranking = [r["layer"] for r in read_manifest(slug)["int8_recovery"]["sensitivity"]["layers"]]
            for k in (int(v) for v in args.float_layers.split(",") if v):
                row = f"{name}, {k} layers float"
                float_layers[row] = ranking[:k]
                files[row] = export_file(run, out / f"qat_float{k}", int8 | {"float_layers": ranking[:k]}, calib,
                                         identity, reuse=reuse)
        else:  # QAT trains on the identity images; the fallback rows are .pte only
            files[name] = export_file(run, slug, int8, calib, identity if int8.get("qat_steps") else None,
                                      reuse=reuse, fmt=fmt)

    rows = run_parity(list(files.values()), run / "data/synthetic.bin", reference=run / "train/backbone/backbone.pt",
                      bounds=ParityBounds.from_any(BOUNDS), repeats=5)
    latency = interleaved_latency({"fp32": str(fp32), **{k: str(v) for k, v in files.items()}}, args.repeats,
                                  args.rounds)
    fp32_ms = latency["fp32"]["runtime_ms"]
    cpu = cpu_facts()
    results = []
    for (name, path), row in zip(files.items(), rows):
        flips = round((100 - row["decision_agreement"]) / 100 * row["num"])
        ms = latency[name]["runtime_ms"]
        noise = float(np.std(np.asarray(row["scores"]) - np.asarray(row["float_scores"])))
        results.append({"method": name, "file": str(path), "float_layers": float_layers.get(name, []),
                        "decision_agreement": row["decision_agreement"], "flips": flips, "pairs": row["num"],
                        "accuracy_drop": row["accuracy_drop"], "tar_drop": row["tar_drop"],
                        "cosine_mean": row["embedding_cosine_mean"], "cosine_min": row["embedding_cosine_min"],
                        "score_noise": noise,
                        "int8_ms": ms, "fp32_ms": fp32_ms, "ratio": ms / fp32_ms, "passed": row["passed"],
                        "reason": row["reason"]})
    table = Table(title=f"int8 trade-off: {run} ({rows[0]['num']} pairs; fp32 {fp32.suffix} {fp32_ms:.2f} ms in "
                        f"the runtime; {describe_cpu(cpu)})")
    for col in ("method", "agreement (flips)", "score noise", "acc. drop", "TAR drop", "cosine mean / min",
                "int8 ms", "x fp32", "bounds"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in results:
        table.add_row(r["method"], f"{r['decision_agreement']:.2f}% ({r['flips']})", f"{r['score_noise']:.4f}",
                      f"{r['accuracy_drop']:.2f}",
                      f"{r['tar_drop']:.2f}", f"{r['cosine_mean']:.5f} / {r['cosine_min']:.4f}",
                      f"{r['int8_ms']:.2f}", f"{r['ratio']:.2f}", "pass" if r["passed"] else "FAIL")
    Console(width=160).print(table)
    write_json_atomic(out / "tradeoff.json", {"run": str(run), "format": fmt, "cpu": cpu, "bounds": BOUNDS,
                                             "rows": results})
    plot(results, out / "tradeoff.png", describe_cpu(cpu))
    print(f"wrote {out / 'tradeoff.json'} and {out / 'tradeoff.png'}")


def plot(results: list[dict], path: Path, cpu: str) -> None:
    """Agreement (left) and score noise (right) against the int8 / fp32 latency ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "decision_agreement", "decision agreement with float (%)"),
                           (axes[1], "score_noise", "score noise (std of int8 - float score)")):
        for n, r in enumerate(results, 1):
            ax.scatter(r["ratio"], r[key], color="tab:green" if r["passed"] else "tab:red")
            ax.annotate(str(n), (r["ratio"], r[key]), fontsize=8, xytext=(4, 2), textcoords="offset points")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("int8 / fp32 latency in the runtime")
        ax.set_ylabel(label)
    axes[0].axhline(BOUNDS["min_decision_agreement"], color="grey", linestyle="--", linewidth=1)
    legend = "\n".join(f"{n}: {r['method']}" for n, r in enumerate(results, 1))
    axes[1].text(1.02, 1.0, legend, transform=axes[1].transAxes, fontsize=7, va="top")
    fig.suptitle(f"int8 trade-off ({cpu})", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
