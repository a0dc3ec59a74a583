"""Where a backbone's int8 error comes from: its int8 weights alone, against the whole int8 graph.

    python benchmarks/bench_int8_error_split.py CHECKPOINT PAIRS [--images 400] [--calibration 64]
        [--calibration-method mse] [--identity RUN/data/train.rec] [--equalize] [--per-activation K]

CHECKPOINT: the float model (e.g. RUN/train/backbone/backbone.pt); PAIRS: a pairs file (e.g.
RUN/data/synthetic.bin). Its distinct images are split in two: the last `--calibration` calibrate
the int8 graph, the first `--images` are measured (disjoint). Each row is 1 - embedding cosine to
the float model, mean and largest, in torch. With `--identity REC`, the calibration images are
instead drawn from that identity dataset as a recipe's export draws them (seed 0), as the int8
files are made, and the first `--images` are measured:
- BatchNorm folded into the convolutions, as the int8 files fold it (float; should be ~1e-13);
- only the folded weights rounded to int8, per output channel and symmetric, as XNNPACK's
  quantizer does, activations float;
- torch's reference int8 graph (PT2E, XNNPACK's scheme: weights and every activation int8), from
  the same function the export uses, with the given calibration method;
- the same, after the export's exact rewrites that put PReLU and SiLU on int8 ops
  (toolchain.export.int8_prelu, int8_silu): the graph the int8 files are made from.
When the last row is many times the second, the activations' rounding is what to work on, and
weight-rounding methods (AdaRound and the like) cannot close the gap.

With `--per-activation K`, each int8 activation of that last graph on the first 24 measured
images: its own rounding noise against its signal (variance ratio, (x - q(x)) over x - mean) and
the share of its values clipped; the count, median and sum over all of them, and the K noisiest.
One badly scaled tensor stands out there; an error spread over many tensors does not.

With `--equalize`, two more int8 graphs: after the conv-pair range equalization alone, and after
it with the residual streams equalized too (toolchain.quantize.equalize). For each int8 graph the
last column counts the pairs (both images measured) whose decision at the float model's best
threshold flips; an image's embedding is the sum over it and its mirror image, as in parity (here of
the two unit vectors).
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
from toolchain.evaluate.metrics import _best_threshold
from toolchain.export.api import resolve_source
from toolchain.export.int8_prelu import with_int8_prelu
from toolchain.export.int8_silu import with_int8_silu
from toolchain.quantize.head import _per_channel
from toolchain.quantize.pt2e import calibration_batches, module_of, quantize_xnnpack_int8
from toolchain.quantize.equalize import equalize_ranges
from toolchain.quantize.batchnorm import fold_batchnorm
from toolchain.quantize.sensitivity import mirrored_embeddings


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


@torch.no_grad()
def activation_noise(converted: nn.Module, images: np.ndarray, mean, std) -> list[tuple[float, float, str]]:
    """(noise / signal variance, clipped share, producing node and its module) for each int8
    activation of a converted PT2E graph (its quantize_per_tensor nodes; folded weights have
    none), noisiest first."""
    sums: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and "quantize_per_tensor" in str(node.target) \
                    and "dequantize" not in str(node.target):
                x, scale, zero_point, lo, hi = (self.env[a] if isinstance(a, torch.fx.Node) else a
                                                for a in node.args[:5])
                steps = torch.round(x / float(scale)) + int(zero_point)
                rounded = (torch.clamp(steps, lo, hi) - int(zero_point)) * float(scale)
                s = sums.setdefault(node, [0.0, 0.0, 0, 0])
                s[0] += float(((x - rounded) ** 2).sum())
                s[1] += float(((x - x.mean()) ** 2).sum())
                s[2] += int(((steps > hi) | (steps < lo)).sum())
                s[3] += x.numel()
            return super().run_node(node)

    for x in calibration_batches(images, mean, std, batch=1):
        Recorder(converted).run(x)
    return sorted(((n / max(sig, 1e-30), c / t, f"{node.args[0]} ({module_of(node.args[0]) or '-'})")
                   for node, (n, sig, c, t) in sums.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("pairs")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--calibration-method", default="mse", choices=["mse", "minmax", "percentile"])
    ap.add_argument("--identity", help="calibrate on this identity dataset (a run's data/train.rec), as the "
                                       "recipe's export does")
    ap.add_argument("--equalize", action="store_true", help="also the equalized int8 graphs")
    ap.add_argument("--per-activation", type=int, default=0, metavar="K",
                    help="also each int8 activation's own noise; list the K noisiest")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _meta, _ = resolve_source(args.checkpoint)
    model.eval()
    spec = model.spec
    pairs = read_bin(args.pairs)
    images, inverse = np.unique(np.concatenate([pairs.images_a, pairs.images_b]), axis=0, return_inverse=True)
    inverse = inverse.reshape(2, -1)
    own = 0 if args.identity else args.calibration  # pair images set aside to calibrate
    if len(images) < args.images + own:
        raise SystemExit(f"error: {args.pairs} has {len(images)} distinct images; "
                         f"--images + --calibration need {args.images + own}")
    measured = images[:args.images]
    if args.identity:
        from toolchain.data import load_identity_dataset
        from toolchain.quantize.calibration import identity_calibration_set

        calibration = identity_calibration_set(load_identity_dataset(args.identity), args.calibration, 0)
    else:
        calibration = images[-args.calibration:]
    reference = mirrored_embeddings(model, measured, 16, spec.mean, spec.std)
    mirrored = measured[:, :, ::-1].copy()
    kept = np.all(inverse < args.images, axis=0)  # pairs whose two images are both measured
    issame = np.asarray(pairs.issame, dtype=bool)[kept]

    def pair_scores(emb: np.ndarray) -> np.ndarray:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return np.sum(emb[inverse[0, kept]] * emb[inverse[1, kept]], axis=1)

    float_scores = pair_scores(reference + mirrored_embeddings(model, mirrored, 16, spec.mean, spec.std))
    threshold, _ = _best_threshold(float_scores, issame)

    def error(module, batch=16, flips=False) -> tuple:
        emb = mirrored_embeddings(module, measured, batch, spec.mean, spec.std)
        cos = np.sum(emb * reference, axis=1)
        flipped = None
        if flips:
            scores = pair_scores(emb + mirrored_embeddings(module, mirrored, batch, spec.mean, spec.std))
            flipped = int(np.sum((scores > threshold) != (float_scores > threshold)))
        return float(1 - cos.mean()), float(1 - cos.min()), flipped

    folded, folds = fold_batchnorm(model)
    example = torch.zeros(1, *spec.input_size)
    full = quantize_xnnpack_int8(model, example, calibration, spec.mean, spec.std,
                                 int8={"calibration": args.calibration_method})
    rows = [(f"BatchNorm folded ({folds} folds), float", error(folded)),
            ("int8 weights only (per channel), float activations", error(int8_weights_only(folded))),
            (f"whole int8 graph (PT2E reference, {args.calibration_method} ranges)", error(full, 1, True))]
    rewritten = with_int8_prelu(model) or model
    rewritten = with_int8_silu(rewritten) or rewritten
    shipped = full  # the graph the int8 files are made from
    if rewritten is not model:
        shipped = quantize_xnnpack_int8(rewritten, example, calibration, spec.mean, spec.std,
                                        int8={"calibration": args.calibration_method})
        rows.append(("the same, with the export's PReLU and SiLU rewrites", error(shipped, 1, True)))
    if args.equalize:
        for streams in (False, True):
            eq, report = equalize_ranges(model, calibration, spec.mean, spec.std, streams=streams)
            q = quantize_xnnpack_int8(eq, example, calibration, spec.mean, spec.std,
                                      int8={"calibration": args.calibration_method})
            rows.append((f"the same, equalized: {report['pairs']} conv pairs, {report['streams']} residual streams",
                         error(q, 1, True)))
    table = Table(title=f"int8 error split: {args.checkpoint}, {len(measured)} images "
                        f"({len(calibration)} {'identity images' if args.identity else 'others'} calibrate); "
                        f"flips of {int(kept.sum())} pairs")
    for col in ("form", "1 - cosine, mean", "1 - cosine, largest", "x weights only", "flipped decisions"):
        table.add_column(col, justify="left" if col == "form" else "right")
    weights = rows[1][1][0]
    for name, (mean, worst, flipped) in rows:
        table.add_row(name, f"{mean:.2e}", f"{worst:.2e}", f"{mean / weights:.1f}" if weights > 0 else "-",
                      "-" if flipped is None else str(flipped))
    console = Console(width=140)
    console.print(table)
    if args.per_activation:
        noise = activation_noise(shipped, measured[:24], spec.mean, spec.std)
        ratios = np.array([r[0] for r in noise])
        acts = Table(title=f"{len(noise)} int8 activations, own noise / signal on {min(24, len(measured))} images: "
                           f"median {np.median(ratios):.2e}, sum {ratios.sum():.2e}")
        for col in ("activation (producing node, module)", "noise / signal", "clipped"):
            acts.add_column(col, justify="left" if col.startswith("activation") else "right")
        for ratio, clipped, node in noise[:args.per_activation]:
            acts.add_row(node, f"{ratio:.2e}", f"{clipped:.2%}")
        console.print(acts)


if __name__ == "__main__":
    main()
