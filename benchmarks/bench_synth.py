"""Throughput of the synthetic face generator (target: >= 500 images/s on 2 cores).

Renders N images to JPEG bytes (what the writers store: pose, expression, lighting, occlusion,
blur, noise and JPEG included) with `--workers` processes, and reports
- wall-clock images/s with that many workers, and
- images per CPU-second of one worker (single process, measured with process_time), times the
  worker count: the rate the same cores reach when nothing else competes for them.
Both are printed because shared machines make wall-clock numbers noisy.

    python benchmarks/bench_synth.py [--images 2000] [--workers 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from toolchain.data.synthetic import SyntheticFaces, iter_render

    n = args.images
    ids = np.arange(n) // 10
    idx = np.arange(n) % 10
    gen = SyntheticFaces(args.seed)
    gen.render_jpeg_batch(ids[:8], idx[:8])  # warm-up (imports, caches)

    # One process: CPU time per image.
    m = min(n, 512)
    c0 = time.process_time()
    w0 = time.perf_counter()
    for _ in iter_render(SyntheticFaces(args.seed), ids[:m], idx[:m], encoded=True, workers=1, batch=args.batch):
        pass
    cpu = time.process_time() - c0
    wall1 = time.perf_counter() - w0

    # Worker pool: wall clock.
    t0 = time.perf_counter()
    count = 0
    for chunk in iter_render(SyntheticFaces(args.seed), ids, idx, encoded=True, workers=args.workers,
                             batch=args.batch):
        count += len(chunk)
    wall = time.perf_counter() - t0
    assert count == n

    table = Table(title=f"synthetic generator: 112x112 JPEG faces, batch {args.batch}")
    table.add_column("measure")
    table.add_column("images/s", justify="right")
    table.add_row(f"wall clock, {args.workers} workers, {n} images", f"{n / wall:.0f}")
    table.add_row(f"wall clock, 1 process, {m} images", f"{m / wall1:.0f}")
    table.add_row("per CPU-second of one process", f"{m / cpu:.0f}")
    table.add_row(f"per CPU-second x {args.workers} cores", f"{args.workers * m / cpu:.0f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
