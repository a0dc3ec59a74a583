"""How hard is the default synthetic benchmark? Scores of simple baselines on its held-out pairs.

Rows:
- pixels: cosine similarity of the normalised raw pixels (x/255-0.5)/0.5;
- mobilefacenet (random init): cosine of the embeddings of a randomly initialised
  MobileFaceNet (eval mode), image + horizontal flip summed, as in the insightface protocol;
- probe (trained): a small CNN (about 0.7M parameters) trained for a few epochs with a
  normalised-softmax (CosFace) head on the benchmark's training identities; shows that the
  identity signal is learnable (a lower bound: a real backbone sees the full 112x112 crop).
  Skipped with --no-probe.

Every row uses the same held-out pairs (identities and families never seen in training) and
toolchain.evaluate.metrics.verification_metrics (10 folds, no shuffle).

    python benchmarks/bench_baselines.py [--seed 0] [--probe-epochs 8] [--no-probe] [--no-random-model] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _pixel_scores(pairs) -> np.ndarray:
    a = pairs.images_a.reshape(len(pairs), -1).astype(np.float32) / 127.5 - 1.0
    b = pairs.images_b.reshape(len(pairs), -1).astype(np.float32) / 127.5 - 1.0
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


@torch.no_grad()
def _embed(model: nn.Module, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    from toolchain.data.transforms import hflip, to_tensor

    model.eval()
    out = []
    for s in range(0, len(images), batch):
        x = to_tensor(images[s:s + batch])
        e = model(x) + model(hflip(x))
        out.append(F.normalize(e, dim=1))
    return torch.cat(out)


def _model_scores(model: nn.Module, pairs) -> np.ndarray:
    # Pairs reuse images: embed each distinct image once.
    both = np.concatenate([pairs.images_a, pairs.images_b])
    keys = [hash(im.tobytes()) for im in both]
    first = {}
    for n, k in enumerate(keys):
        first.setdefault(k, n)
    order = list(first.values())
    emb = _embed(model, both[order])
    where = {k: i for i, k in enumerate(first)}
    e = emb[[where[k] for k in keys]]
    ea, eb = e[: len(pairs)], e[len(pairs):]
    return (ea * eb).sum(1).numpy()


class Probe(nn.Module):
    """A small plain CNN on the 2x-downsampled crop (56x56, to keep CPU training short):
    4 stages of two 3x3 convs, global average pool, 128-d embedding."""

    def __init__(self, dim: int = 128):
        super().__init__()
        chans = [3, 32, 64, 128, 160]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = self.features(F.avg_pool2d(x, 2)).mean((2, 3))
        return self.bn(self.fc(x))


def train_probe(train, epochs: int, seed: int = 0, log=print) -> nn.Module:
    """CosFace (s=30, m=0.3) on the training identities; random flips; Adam."""
    from toolchain.data.transforms import hflip, to_tensor

    torch.manual_seed(seed)
    model = Probe()
    weight = nn.Parameter(torch.randn(train.num_classes, 128) * 0.01)
    opt = torch.optim.AdamW(list(model.parameters()) + [weight], lr=3e-3, weight_decay=5e-4)
    n = len(train)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
    labels = torch.from_numpy(train.labels)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        tot, t0 = 0.0, time.time()
        for s in range(0, n - 127, 128):
            idx = perm[s:s + 128]
            x = to_tensor(train.images[idx.numpy()])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x[flip] = hflip(x[flip])
            y = labels[idx]
            cos = F.normalize(model(x)) @ F.normalize(weight).t()
            logits = 30.0 * (cos - 0.3 * F.one_hot(y, train.num_classes))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        log(f"  probe epoch {ep + 1}/{epochs}: loss {tot / max(n // 128, 1):.3f} ({time.time() - t0:.0f} s)")
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-epochs", type=int, default=8)
    ap.add_argument("--no-probe", action="store_true", help="skip the trained probe")
    ap.add_argument("--no-random-model", action="store_true", help="skip the random-init MobileFaceNet")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    from rich.console import Console
    from rich.table import Table

    from toolchain.data.datasets import SyntheticIdentityDataset
    from toolchain.data.synthetic import default_benchmark
    from toolchain.evaluate.metrics import verification_metrics

    console = Console(force_terminal=False)
    bench = default_benchmark(seed=args.seed)
    t0 = time.time()
    pairs = bench.verification_pairs(workers=args.workers)
    console.print(f"benchmark: {bench.to_dict()}")
    console.print(f"rendered {len(pairs)} held-out pairs in {time.time() - t0:.1f} s")

    rows = []

    def add(name, scores):
        m = verification_metrics(scores, pairs.issame)
        rows.append({"baseline": name, **{k: m[k] for k in ("accuracy", "accuracy_std", "auc", "eer", "tar_at_far")}})

    add("pixels (cosine)", _pixel_scores(pairs))
    console.print(rows[-1])
    try:
        if args.no_random_model:
            raise RuntimeError("--no-random-model")
        from toolchain.models import build_model

        torch.manual_seed(args.seed)
        add("mobilefacenet (random init)", _model_scores(build_model("mobilefacenet"), pairs))
        console.print(rows[-1])
    except Exception as exc:  # noqa: BLE001 - the zoo may not be there yet; say so in the table
        console.print(f"[yellow]mobilefacenet baseline skipped: {exc}[/yellow]")
    if not args.no_probe:
        t0 = time.time()
        train = SyntheticIdentityDataset(bench, workers=args.workers)
        console.print(f"rendered {len(train)} training images ({train.num_classes} identities) "
                      f"in {time.time() - t0:.1f} s")
        t0 = time.time()
        probe = train_probe(train, args.probe_epochs, args.seed, log=console.print)
        add(f"probe CNN (trained {args.probe_epochs} ep, {time.time() - t0:.0f} s)", _model_scores(probe, pairs))

    table = Table(title=f"Default synthetic benchmark (seed {args.seed}): {len(pairs)} held-out pairs, "
                        f"{bench.val_identities} identities")
    for col in ("baseline", "accuracy", "AUC", "EER", "TAR@FAR=1e-3"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["baseline"], f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
                      f"{r['auc']:.3f}", f"{100 * r['eer']:.1f}", f"{100 * r['tar_at_far']['1e-3']:.1f}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": bench.to_dict(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
