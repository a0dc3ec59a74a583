"""What the exact PReLU adds do for a backbone's all-int8 `.tflite`: parity with and without them.

    python benchmarks/bench_tflite_prelu_adds.py RECIPE RUN [--pairs 1000] [--calibration 64]

RECIPE: a backbone recipe; RUN: its run folder (`toolchain run RECIPE --out RUN`, or one `seed-N`
folder of benchmarks/bench_recipe_seeds.py), which has the float model
(RUN/train/backbone/backbone.pt), the identity images (RUN/data/train.rec), the held-out pairs
(RUN/data/synthetic.bin) and their float threshold (RUN/manifest.json).

Each int8 `.tflite` computes a PReLU as x + relu(-(1 - a)*x), a depthwise 1x1 and an add
(toolchain.export.int8_prelu). The export gives each add and its branch the input's grid step
where that errs less, so the add sums integers exactly
(toolchain.export.tflite_calibration.exact_prelu_adds). This script converts the float model
twice through the export's onnx2tf path, all int8 (no QAT, no fallback, no outlier screen or
full-range layers: the recipe's calibration method, bias correction and equalization, calibrated
on the run's identity draw), once as the export does and
once with every add calibrated tensor by tensor, and measures both in LiteRT on the first
`--pairs` pairs: the cosine of each image's embedding (plus its mirror's, as parity embeds them)
to float, mean and lowest, and the pairs whose decision at the float threshold flips.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from toolchain.data import load_identity_dataset
from toolchain.data.insightface_bin import read_bin
from toolchain.environment import describe_cpu
from toolchain.quantize.calibration import identity_calibration_set
from toolchain.quantize.int8_options import Int8Options
from toolchain.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--pairs", type=int, default=1000, help="held-out pairs measured (the first N)")
    ap.add_argument("--calibration", type=int, default=None, help="calibration images (default: the recipe's)")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)

    import toolchain.export.tflite_calibration as calibration
    from toolchain.export.api import _exact_input_view, resolve_source
    from toolchain.export.int8_prelu import with_int8_prelu
    from toolchain.export.int8_silu import with_int8_silu
    from toolchain.export.tflite import export_tflite_onnx2tf
    from toolchain.export.tflite_fallback import litert_embeddings
    from toolchain.quantize.equalize import equalize_ranges
    from toolchain.quantize.sensitivity import mirrored_embeddings

    recipe = load_recipe(args.recipe)
    export = recipe.export
    int8 = Int8Options.from_any(export.int8, "tflite")
    manifest = json.loads((args.run / "manifest.json").read_text())
    model, _, _ = resolve_source(str(args.run / "train" / "backbone" / "backbone.pt"))
    model.eval()
    spec = model.spec
    pairs = read_bin(args.run / "data" / "synthetic.bin")
    n = min(args.pairs, len(pairs.issame))
    threshold = manifest["int8_recovery"]["agreement_target"]["score_threshold"]
    images = np.concatenate([pairs.images_a[:n], pairs.images_b[:n]])
    size = args.calibration or export.calibration_images
    calib = identity_calibration_set(load_identity_dataset(args.run / "data" / "train.rec"), size,
                                     int(manifest["recipe"]["seed"]))
    exact_model, exact_spec = _exact_input_view(model)
    if int8.equalize:
        exact_model, _ = equalize_ranges(exact_model, calib, exact_spec.mean, exact_spec.std)
    exact_model = with_int8_silu(exact_model) or exact_model
    int8_model = with_int8_prelu(exact_model) or exact_model
    example = torch.zeros(1, *exact_spec.input_size)
    options = Int8Options(calibration=int8.calibration, percentile=int8.percentile,
                          bias_correction=int8.bias_correction)

    reference = mirrored_embeddings(model, images, 16, spec.mean, spec.std)
    m = np.asarray(spec.mean, np.float32).reshape(1, 1, 1, -1)
    s = np.asarray(spec.std, np.float32).reshape(1, 1, 1, -1)
    views = [((v.astype(np.float32) / 255.0 - m) / s).astype(np.float32)
             for v in (images, np.ascontiguousarray(images[:, :, ::-1]))]

    def decisions(emb: np.ndarray) -> np.ndarray:
        return (emb[:n] * emb[n:]).sum(1) >= threshold

    float_decisions = decisions(reference)
    rows = []
    choose = calibration.exact_prelu_adds
    for form, exact in (("calibrated tensor by tensor", False), ("exact adds (the export)", True)):
        chosen = []

        def adds(buf, inputs, exact=exact, chosen=chosen):
            if not exact:
                return buf, []
            out, changed = choose(buf, inputs)
            chosen.extend(changed)
            return out, changed

        start = time.time()
        with patch.object(calibration, "exact_prelu_adds", adds):
            buf = export_tflite_onnx2tf(int8_model, example, ["int8"], calib, exact_spec.mean, exact_spec.std,
                                        exact_input=True, int8=options)["int8"]
        emb = litert_embeddings(buf, views[0]) + litert_embeddings(buf, views[1])
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        cos = (emb * reference).sum(1)
        rows.append({"form": form, "exact_adds": len(chosen), "one_minus_cosine_mean": float(1 - cos.mean()),
                     "cosine_min": float(cos.min()), "flips": int((decisions(emb) != float_decisions).sum()),
                     "seconds": round(time.time() - start)})
        console.print(f"{form}: {rows[-1]}")

    table = Table(title=f"{args.recipe.name}, all-int8 .tflite (no QAT, no fallback), {len(images)} images of "
                        f"{n} pairs; {describe_cpu()}")
    for col in ("PReLU adds", "exact", "1 - cosine, mean", "cosine, lowest", "flips"):
        table.add_column(col, justify="left" if col == "PReLU adds" else "right")
    for r in rows:
        table.add_row(r["form"], str(r["exact_adds"]), f"{r['one_minus_cosine_mean']:.6f}",
                      f"{r['cosine_min']:.5f}", f"{r['flips']} of {n}")
    console.print(table)
    ratio = rows[1]["one_minus_cosine_mean"] / rows[0]["one_minus_cosine_mean"]
    console.print(f"1 - cosine with exact adds / without: {ratio:.2f}")


if __name__ == "__main__":
    main()
