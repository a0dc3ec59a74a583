"""Is an int8 file's low cosine the quantiser's fault or the float model's? Per-image embedding
cosine of an int8 artifact to its float model, split by whether the float model's activations
explode on the image (toolchain.quantize.outliers).

    python benchmarks/bench_activation_outliers.py CHECKPOINT ARTIFACT PAIRS [--factor 8]

CHECKPOINT: the float model (e.g. RUN/train/backbone/backbone.pt); ARTIFACT: an int8 `.pte` or
`.tflite` of it; PAIRS: the pairs file the parity stage used (e.g. RUN/data/synthetic.bin). Every
distinct pair image is run once. An image is an outlier when its largest activation at some
leaf module exceeds `factor` times the median over the pair images there.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from toolchain.data.insightface_bin import read_bin
from toolchain.export.api import resolve_source
from toolchain.quantize.outliers import activation_peaks
from toolchain.runtime import load_runner
from toolchain.runtime.torch_runner import TorchRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("artifact")
    ap.add_argument("pairs")
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--min-cosine", type=float, default=0.99, help="the parity bound on the minimum cosine")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _meta, _ = resolve_source(args.checkpoint)
    spec = model.spec
    pairs = read_bin(args.pairs)
    images = np.concatenate([np.asarray(pairs.images_a), np.asarray(pairs.images_b)])
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    images = images[np.sort(first)]
    ref = TorchRunner(model).run(images)
    out = load_runner(args.artifact).run(images)
    cosine = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    _names, peaks = activation_peaks(model, images, spec.mean, spec.std)
    outlier = (peaks / np.maximum(np.median(peaks, axis=0), 1e-12)).max(axis=1) > args.factor
    low = cosine < args.min_cosine

    table = Table(title=f"{args.artifact}: embedding cosine to float per distinct pair image")
    for col in ("images", "count", "cosine mean", "cosine min", f"below {args.min_cosine:g}"):
        table.add_column(col, justify="left" if col == "images" else "right")
    for name, mask in (("all", np.ones_like(outlier)), (f"activations > {args.factor:g} x median", outlier),
                       ("the others", ~outlier)):
        if mask.any():
            table.add_row(name, str(int(mask.sum())), f"{cosine[mask].mean():.5f}", f"{cosine[mask].min():.4f}",
                          str(int((low & mask).sum())))
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
