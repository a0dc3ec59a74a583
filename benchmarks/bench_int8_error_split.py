"""Where a backbone's int8 error comes from: its int8 weights alone, against the whole int8 graph.

    python benchmarks/bench_int8_error_split.py CHECKPOINT PAIRS [--images 400] [--calibration 64]
        [--calibration-method mse]

CHECKPOINT: the float model (e.g. RUN/train/backbone/backbone.pt); PAIRS: a pairs file (e.g.
RUN/data/synthetic.bin). Its distinct images are split in two: the last `--calibration` calibrate
the int8 graph, the first `--images` are measured (disjoint). Each row is 1 - embedding cosine to
the float model, mean and largest, in torch:
- BatchNorm folded into the convolutions, as the int8 files fold it (float; should be ~1e-13);
- only the folded weights rounded to int8, per output channel and symmetric, as XNNPACK's
  quantizer does, activations float;
- torch's reference int8 graph (PT2E, XNNPACK's scheme: weights and every activation int8), from
  the same function the export uses, with the given calibration method.
When the last row is many times the second, the activations' rounding is what to work on, and
weight-rounding methods (AdaRound and the like) cannot close the gap.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from toolchain.data.insightface_bin import read_bin
from toolchain.export.api import resolve_source
from toolchain.quantize.head import _per_channel
from toolchain.quantize.pt2e import quantize_xnnpack_int8
from toolchain.quantize.qat import fold_batchnorm
from toolchain.quantize.sensitivity import _embed


@torch.no_grad()
def int8_weights_only(model: nn.Module) -> nn.Module:
    """A copy whose conv and linear weights are rounded to int8, per output channel, symmetric
    (the per-user head's rounding, toolchain.quantize.head)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            q, scale = _per_channel(m.weight.reshape(m.weight.shape[0], -1).numpy())
            m.weight.copy_(torch.from_numpy(q.astype(np.float32) * scale[:, None]).reshape(m.weight.shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("pairs")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--calibration-method", default="mse", choices=["mse", "minmax", "percentile"])
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _meta, _ = resolve_source(args.checkpoint)
    model.eval()
    spec = model.spec
    pairs = read_bin(args.pairs)
    images = np.unique(np.concatenate([pairs.images_a, pairs.images_b]), axis=0)
    if len(images) < args.images + args.calibration:
        raise SystemExit(f"error: {args.pairs} has {len(images)} distinct images; "
                         f"--images + --calibration need {args.images + args.calibration}")
    measured, calibration = images[:args.images], images[-args.calibration:]
    reference = _embed(model, measured, 16, spec.mean, spec.std)

    def error(module, batch=16) -> tuple[float, float]:
        cos = np.sum(_embed(module, measured, batch, spec.mean, spec.std) * reference, axis=1)
        return float(1 - cos.mean()), float(1 - cos.min())

    folded, folds = fold_batchnorm(model)
    example = torch.zeros(1, *spec.input_size)
    full = quantize_xnnpack_int8(model, example, calibration, spec.mean, spec.std,
                                 int8={"calibration": args.calibration_method})
    rows = [(f"BatchNorm folded ({folds} folds), float", error(folded)),
            ("int8 weights only (per channel), float activations", error(int8_weights_only(folded))),
            (f"whole int8 graph (PT2E reference, {args.calibration_method} ranges)", error(full, batch=1))]
    table = Table(title=f"int8 error split: {args.checkpoint}, {len(measured)} images "
                        f"({len(calibration)} others calibrate)")
    for col in ("form", "1 - cosine, mean", "1 - cosine, largest", "x weights only"):
        table.add_column(col, justify="left" if col == "form" else "right")
    weights = rows[1][1][0]
    for name, (mean, worst) in rows:
        table.add_row(name, f"{mean:.2e}", f"{worst:.2e}", f"{mean / weights:.1f}" if weights > 0 else "-")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
