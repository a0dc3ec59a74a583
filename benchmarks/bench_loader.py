"""Images/s of the training data readers (RecordIO and image folder) through a torch DataLoader.

Each reader decodes JPEG records to normalised float tensors, as the backbone trainer consumes
them, with `--workers` worker counts (0 = in the main process). It prints one table, with each
rate's ratio to the RecordIO reader with 0 workers, all measured in the same run. By default it
writes a synthetic set in both layouts to a temporary folder; `--rec` and `--folder` point it at
real data (e.g. a run's data/train.rec and ../shared/faces/lfw-train).

    python benchmarks/bench_loader.py [--images 2048] [--workers 0,1,2] [--batch 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _rate(dataset, workers: int, batch: int, limit: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0),
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    seen, start = 0, None
    for k, (x, _) in enumerate(loader):
        if k == 0:  # the first batch pays for worker start-up: not counted
            start = time.perf_counter()
            continue
        seen += len(x)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start) if seen else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2048, help="images read per measurement")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rec", default=None, help="a .rec (or folder holding train.rec) to read instead")
    ap.add_argument("--folder", default=None, help="an identity image folder to read instead")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from toolchain.data import load_identity_dataset, write_synthetic

    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rec, folder = args.rec, args.folder
        if rec is None or folder is None:
            n_ids = max(2, args.images // 8)
            if rec is None:
                rec = Path(tmp) / "rec"
                write_synthetic(rec, identities=n_ids, images_per_identity=8, fmt="insightface", workers=2)
            if folder is None:
                folder = Path(tmp) / "folder"
                write_synthetic(folder, identities=n_ids, images_per_identity=8, fmt="folder", workers=2)
        readers = {"RecordIO": load_identity_dataset(rec), "image folder": load_identity_dataset(folder)}
        rows = [(name, w, _rate(ds, w, args.batch, args.images)) for name, ds in readers.items() for w in workers]
    base = next(r for n, w, r in rows if n == "RecordIO" and w == workers[0])
    cpu = _cpu_name()
    table = Table(title=f"data loader throughput, batch {args.batch}, {args.images} images per row "
                        f"({cpu}; {os.cpu_count()} cores)")
    for col in ("reader", "workers", "images/s", f"vs RecordIO, {workers[0]} workers"):
        table.add_column(col, justify="left" if col == "reader" else "right")
    for name, w, rate in rows:
        table.add_row(name, str(w), f"{rate:,.0f}", f"{rate / base:.2f}")
    Console().print(table)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
