"""Which int8 activations cost a backbone's embedding cosine: each one's rounding removed alone.

    python benchmarks/bench_activation_ablation.py CHECKPOINT IDENTITY PAIRS [--images 32]
        [--calibration-method mse] [--top 25] [--threads 1]

CHECKPOINT: the float model (e.g. RUN/train/backbone/backbone.pt); IDENTITY: the recipe's identity
data (RUN/data/train.rec), from which 64 calibration images are drawn as the export draws them
(seed 0); PAIRS: the pairs file (RUN/data/synthetic.bin), whose first `--images` distinct images
are measured. The graph is the `.pte`'s: the export's rewrites (row stem, SiLU as x * sigmoid(x))
under the toolchain's XNNPACK quantizer with the given calibration method, in torch (PT2E observers
turned into fake quantisation). The input's rounding is left out: the int8 files take the pixel
grid exactly (toolchain.quantize.exact_input).

It prints 1 - cosine to the float model with everything int8, with the weights float, and with
the activations float; then, for each activation alone left in float, how much 1 - cosine falls,
the largest first, and the sums by op type. bench_int8_error_split.py gives each tensor's local
noise in one pass; this one costs one pass over the images per activation, and measures what
each rounding does to the embedding.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn


class _FakeQuant(nn.Module):
    """An observer's calibrated quantisation as one switchable fake-quantise step."""

    def __init__(self, observer):
        super().__init__()
        scale, zero_point = observer.calculate_qparams()
        self.scale, self.zero_point = scale.float(), zero_point.int()
        self.per_channel = scale.numel() > 1
        self.axis = getattr(observer, "ch_axis", 0)
        self.qmin, self.qmax = observer.quant_min, observer.quant_max
        self.on = True

    def forward(self, x):
        if not self.on:
            return x
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis,
                                                          self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.qmin,
                                                     self.qmax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("identity")
    ap.add_argument("pairs")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--calibration-method", default="mse")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from toolchain.data import load_identity_dataset, load_pairs
    from toolchain.export.api import resolve_source
    from toolchain.export.int8_silu import with_int8_silu
    from toolchain.export.row_stem import with_row_stem
    from toolchain.quantize.calibration import identity_calibration_set
    from toolchain.quantize.int8_options import Int8Options
    from toolchain.quantize.pt2e import calibration_batches, module_of, xnnpack_quantizer
    from toolchain.runtime.preprocess import model_input

    model, _, _ = resolve_source(args.checkpoint)
    spec = model.spec
    calib = identity_calibration_set(load_identity_dataset(args.identity), 64, 0)
    pairs = load_pairs(args.pairs)
    images = np.concatenate([pairs.images_a, pairs.images_b])
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)  # as bench_activation_outliers
    images = images[np.sort(first)][:args.images]
    batch = 16
    xs = [torch.from_numpy(model_input(images[i:i + batch], spec.mean, spec.std))
          for i in range(0, len(images), batch)]
    with torch.no_grad():
        ref = torch.cat([model(x) for x in xs])
    int8_model = with_int8_silu(model) or model
    int8_model = with_row_stem(int8_model, spec.input_size[2]) or int8_model
    graph = torch.export.export(int8_model.eval(), (xs[0],), strict=False).module()
    prepared = prepare_pt2e(graph, xnnpack_quantizer(Int8Options(calibration=args.calibration_method)))
    with torch.no_grad():
        for x in calibration_batches(calib, spec.mean, spec.std, batch=batch):
            if len(x) == batch:  # the graph's batch size is static
                prepared(x)

    activations, weights = {}, []
    for n in list(prepared.graph.nodes):
        if n.op != "call_module" or "activation_post_process" not in str(n.target):
            continue
        fq = _FakeQuant(getattr(prepared, n.target))
        setattr(prepared, n.target, fq)
        src = n.args[0]
        if getattr(src, "op", "") == "get_attr" or fq.per_channel:
            weights.append(fq)
        elif getattr(src, "op", "") == "placeholder":
            fq.on = False  # the files' input grid is exact
        else:
            op = str(src.target).replace("aten.", "").replace(".default", "").replace(".Tensor", "")
            activations[n.target] = (fq, op, module_of(src) or "")
    prepared.recompile()

    def error() -> float:
        with torch.no_grad():
            out = torch.cat([prepared(x) for x in xs])
        return float((1 - nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1))).mean())

    def with_off(fqs) -> float:
        for fq in fqs:
            fq.on = False
        e = error()
        for fq in fqs:
            fq.on = True
        return e

    start = time.time()
    base = error()
    console = Console()
    console.print(f"{spec.name}, {len(images)} pair images, calibration {args.calibration_method}: 1 - cosine "
                  f"all int8 {base:.6f}; weights float {with_off(weights):.6f}; activations float "
                  f"{with_off([a[0] for a in activations.values()]):.6f} ({len(activations)} activation "
                  f"quantisers, {len(weights)} weight ones)")
    rows = []
    for fq, op, module in activations.values():
        rows.append((base - with_off([fq]), op, module, fq))
    rows.sort(key=lambda r: -r[0])
    table = Table(title=f"activation left in float alone: fall of 1 - cosine ({time.time() - start:.0f} s)")
    for col in ("fall", "of all-int8", "written by", "module", "int8 step"):
        table.add_column(col)
    for fall, op, module, fq in rows[:args.top]:
        table.add_row(f"{fall:.6f}", f"{100 * fall / base:.1f}%", op, module, f"{float(fq.scale):.4g}")
    console.print(table)
    by_op = collections.Counter()
    for fall, op, _, _ in rows:
        by_op[op] += fall
    console.print("sums by op: " + ", ".join(f"{op} {v:.6f} ({100 * v / base:.0f}%)" for op, v in by_op.most_common()))


if __name__ == "__main__":
    main()
