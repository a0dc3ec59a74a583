"""Does fine-tuning the float model together with its int8 self make the int8 scores quieter?

    python benchmarks/bench_int8_joint_finetune.py RUN [--steps 300] [--lr 1e-4] [--anchor 1.0]
        [--qat-steps 300] [--qat-lr 1e-5]

RUN: a finished embedding recipe run (its train/backbone/backbone.pt, data/synthetic.bin and
data/train.rec). The export's QAT (toolchain.quantize.qat) moves only the int8 model's weights
towards a fixed float model. Here the float model moves too: each step runs one batch of identity
images through the BatchNorm-folded model twice, with int8 fake quantisation off and on (the same
weights, XNNPACK's scheme, ranges calibrated as the export does and frozen), and minimises
(1 - cosine(int8, float)) + anchor x (1 - cosine(float, original float)). The anchor keeps the
float model near the trained one. The float model is then the tuned one, and parity would
measure the int8 file against it.

Three rows, each measured in torch's reference int8 graph (PT2E, the `.pte`'s scheme with
XNNPACK's own int8 PReLU, MSE ranges from the recipe's 64 calibration images, equalized as the
recipes do) on all of the run's pairs, each image's embedding summed with its mirror's as in
parity: plain PTQ; the export's QAT for `--qat-steps` (against the original float model); the
joint fine-tune (against the tuned float model). Columns: the float model's accuracy at its best
threshold, its pairs within 0.01 of that threshold, the score noise (std over the pairs of
int8 score - float score), the flips measured and expected at that noise
(toolchain.evaluate.flips), and the noise budget for 99.5% agreement.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from toolchain.data.datasets import load_identity_dataset
from toolchain.data.insightface_bin import read_bin
from toolchain.evaluate.flips import allowed_flips, expected_flips, noise_budget
from toolchain.evaluate.metrics import _best_threshold
from toolchain.export.api import resolve_source
from toolchain.quantize.batchnorm import fold_batchnorm
from toolchain.quantize.calibration import identity_calibration_set
from toolchain.quantize.equalize import equalize_ranges
from toolchain.quantize.int8_options import Int8Options
from toolchain.quantize.pt2e import calibration_batches, quantize_xnnpack_int8
from toolchain.quantize.qat import _is_weight, _qat_quantizer, qat_finetune
from toolchain.quantize.sensitivity import mirrored_embeddings
from toolchain.runtime.preprocess import model_input

INT8 = {"calibration": "mse"}


def joint_finetune(model: nn.Module, identity: np.ndarray, calibration: np.ndarray, mean, std, *, steps: int,
                   lr: float, anchor: float, batch: int = 16, seed: int = 0) -> tuple[nn.Module, list]:
    """A BatchNorm-folded copy of `model` tuned so that its int8 fake-quantised outputs follow its
    own float outputs (module docstring). -> (tuned float model, [(step, anchor loss, gap loss)])."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    student, _ = fold_batchnorm(model)

    def draw() -> torch.Tensor:
        pick = identity[rng.choice(len(identity), batch, replace=False)]
        flip = rng.random(batch) < 0.5
        pick = np.where(flip[:, None, None, None], pick[:, :, ::-1], pick)
        return torch.from_numpy(model_input(np.ascontiguousarray(pick), mean, std))

    graph = torch.export.export(student, (draw(),), strict=False).module()
    prepared = prepare_qat_pt2e(graph, _qat_quantizer(Int8Options.from_any(INT8)))
    move_exported_model_to_eval(prepared)
    fake_quants = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]

    def fake_quant(on: bool) -> None:
        for m in fake_quants:
            m.enable_fake_quant() if on else m.disable_fake_quant()

    with torch.no_grad():  # calibrate as the export does, then freeze the activation ranges
        fake_quant(False)
        for x in calibration_batches(np.concatenate([calibration] * -(-batch // len(calibration))), mean, std,
                                     batch=batch):
            if len(x) == batch:
                prepared(x)
        fake_quant(True)
        for m in fake_quants:
            if not _is_weight(m):
                m.disable_observer()
    optimizer = torch.optim.Adam([p for p in prepared.parameters() if p.requires_grad], lr=lr)

    def cosine(a, b):
        return nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)

    trail = []
    for step in range(steps):
        x = draw()
        with torch.no_grad():
            original = model(x)
        fake_quant(False)
        clean = prepared(x)
        fake_quant(True)
        quantised = prepared(x)
        drift, gap = (1 - cosine(clean, original)).mean(), (1 - cosine(quantised, clean)).mean()
        optimizer.zero_grad(set_to_none=True)
        (anchor * drift + gap).backward()
        optimizer.step()
        trail.append((step, float(drift.detach()), float(gap.detach())))
        if step % 25 == 0 or step == steps - 1:
            print(f"joint step {step}: drift {trail[-1][1]:.2e}, int8 gap {trail[-1][2]:.2e}", flush=True)
    tuned = prepared.state_dict()
    state = student.state_dict()
    student.load_state_dict({k: tuned.get(k, v) for k, v in state.items()})
    return student.to(memory_format=torch.contiguous_format).eval(), trail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, default=300, help="joint fine-tuning steps (batch 16)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--anchor", type=float, default=1.0, help="weight of the float model's drift")
    ap.add_argument("--qat-steps", type=int, default=300, help="the export's QAT, for comparison (0: skip)")
    ap.add_argument("--qat-lr", type=float, default=1e-5)
    ap.add_argument("--min-agreement", type=float, default=99.5)
    args = ap.parse_args()
    started = time.time()
    model, _, _ = resolve_source(f"{args.run}/train/backbone/backbone.pt")
    model.eval()
    spec = model.spec
    mean, std = spec.mean, spec.std
    pairs = read_bin(f"{args.run}/data/synthetic.bin")
    images, inverse = np.unique(np.concatenate([pairs.images_a, pairs.images_b]), axis=0, return_inverse=True)
    inverse = inverse.reshape(2, -1)
    mirrored = images[:, :, ::-1].copy()
    issame = np.asarray(pairs.issame, dtype=bool)
    dataset = load_identity_dataset(f"{args.run}/data/train.rec")
    calibration = identity_calibration_set(dataset, 64, 0)  # the recipes' export draw (seed 0)
    identity = np.stack([dataset.get_uint8(i) for i in range(len(dataset))])
    example = torch.zeros(1, *spec.input_size)
    allowed = allowed_flips(len(issame), args.min_agreement)

    def scores(module, batch: int) -> np.ndarray:
        e = mirrored_embeddings(module, images, batch, mean, std) + mirrored_embeddings(module, mirrored, batch, mean, std)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return np.sum(e[inverse[0]] * e[inverse[1]], axis=1)

    rows = []

    def measure(name: str, float_model: nn.Module, quantised_from: nn.Module) -> None:
        int8_graph = quantize_xnnpack_int8(quantised_from, example, calibration, mean, std, int8=INT8)
        fs, qs = scores(float_model, 16), scores(int8_graph, 1)  # the int8 graph's batch is static
        t, accuracy = _best_threshold(fs, issame)
        noise = float((qs - fs).std())
        rows.append((name, f"{accuracy:.2%}", str(int(np.sum(np.abs(fs - t) < 0.01))), f"{noise:.5f}",
                     str(int(np.sum((qs > t) != (fs > t)))), f"{expected_flips(fs, t, noise):.1f}",
                     f"{noise_budget(fs, t, allowed):.5f}", f"{time.time() - started:.0f}"))
        print(rows[-1], flush=True)

    equalized, _ = equalize_ranges(model, calibration, mean, std, streams=True)
    measure("PTQ (equalized, mse)", model, equalized)
    if args.qat_steps:
        tuned, _ = qat_finetune(equalized, identity, mean, std, steps=args.qat_steps, lr=args.qat_lr,
                                calibration=calibration, int8=INT8, progress=False)
        measure(f"export's QAT, {args.qat_steps} steps, lr {args.qat_lr:g}", model, tuned)
    joint, trail = joint_finetune(equalized, identity, calibration, mean, std, steps=args.steps, lr=args.lr,
                                  anchor=args.anchor)
    measure(f"joint, {args.steps} steps, lr {args.lr:g}, anchor {args.anchor:g} (float = tuned)", joint, joint)
    table = Table(title=f"{args.run}: {len(issame)} pairs, {allowed} flips allowed; joint drift / gap first "
                        f"{trail[0][1]:.1e} / {trail[0][2]:.1e}, last 25 steps' mean "
                        f"{np.mean([t[1] for t in trail[-25:]]):.1e} / {np.mean([t[2] for t in trail[-25:]]):.1e}")
    for col in ("int8 from", "float accuracy", "pairs within 0.01", "score noise", "flips", "expected",
                "noise budget", "s"):
        table.add_column(col, justify="left" if col == "int8 from" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
