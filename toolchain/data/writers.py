"""Write a synthetic benchmark to disk in the real formats, so the same loaders read it.

Layouts (OUT is written under a temporary sibling name and renamed when complete):

folder:
    OUT/train/<identity:05d>/<index:04d>.jpg   training identities 0..N-1
    OUT/verify/<identity:05d>/<index:04d>.jpg  held-out identities (val_offset..)
    OUT/pairs.tsv                              held-out pairs (folder.py's pairs list)
    OUT/synth.json                             the generator settings

insightface:
    OUT/train.rec, OUT/train.idx, OUT/property  training identities (recordio.py's layout)
    OUT/synthetic.bin                           held-out pairs (insightface_bin.py's layout)
    OUT/synth.json

The JPEG bytes written are exactly the generator's (its JPEG nuisance), never re-encoded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from toolchain.data import recordio
from toolchain.data.folder import write_pairs_tsv
from toolchain.data.insightface_bin import write_bin
from toolchain.data.synthetic import SyntheticBenchmark, _round_up, iter_render
from toolchain.errors import ToolchainError

FORMATS = ("folder", "insightface")
META_NAME = "synth.json"
FORMAT_VERSION = 1


def benchmark_for(identities: int, images_per_identity: int, seed: int = 0, *, val_identities: int | None = None,
                  val_images_per_identity: int | None = None, pairs: int | None = None, family_size: int = 4,
                  hard_negative_fraction: float = 0.5) -> SyntheticBenchmark:
    """A SyntheticBenchmark with the documented defaults for the held-out split:
    val_identities = max(2 families, a quarter of the training identities rounded up to whole
    families); val_images_per_identity = max(2, images_per_identity); pairs = 3 per held-out
    image, rounded down to a multiple of 20, between 20 and 3000."""
    if val_identities is None:
        val_identities = max(2 * family_size, _round_up(max(identities // 4, 1), family_size))
    if val_images_per_identity is None:
        val_images_per_identity = max(2, images_per_identity)
    if pairs is None:
        pairs = min(3000, max(20, (3 * val_identities * val_images_per_identity) // 20 * 20))
    return SyntheticBenchmark(seed=seed, train_identities=identities, images_per_identity=images_per_identity,
                              val_identities=val_identities, val_images_per_identity=val_images_per_identity,
                              pairs=pairs, family_size=family_size, hard_negative_fraction=hard_negative_fraction)


def write_synthetic(out_dir, identities: int, images_per_identity: int, seed: int = 0, fmt: str = "folder", *,
                    val_identities: int | None = None, val_images_per_identity: int | None = None,
                    pairs: int | None = None, family_size: int = 4, hard_negative_fraction: float = 0.5,
                    workers: int = 1, overwrite: bool = False, progress=None) -> dict:
    """Generate and write a synthetic data set; returns a summary dict (also in synth.json)."""
    bench = benchmark_for(identities, images_per_identity, seed, val_identities=val_identities,
                          val_images_per_identity=val_images_per_identity, pairs=pairs, family_size=family_size,
                          hard_negative_fraction=hard_negative_fraction)
    return write_benchmark(out_dir, bench, fmt, workers=workers, overwrite=overwrite, progress=progress)


def total_images(bench: SyntheticBenchmark) -> int:
    return bench.train_identities * bench.images_per_identity + bench.val_identities * bench.val_images_per_identity


def write_benchmark(out_dir, bench: SyntheticBenchmark, fmt: str = "folder", *, workers: int = 1,
                    overwrite: bool = False, progress=None) -> dict:
    if fmt not in FORMATS:
        raise ToolchainError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ToolchainError(f"{out}: exists and is not empty (--overwrite, or overwrite=True, replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        summary = _write(tmp, bench, fmt, workers, progress)
        summary["path"] = str(out)
        (tmp / META_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write(root: Path, bench: SyntheticBenchmark, fmt: str, workers: int, progress) -> dict:
    gen = bench.generator()
    k = bench.images_per_identity
    train_ids = np.repeat(bench.train_ids, k)
    train_idx = np.tile(np.arange(k), bench.train_identities)
    kv = bench.val_images_per_identity
    val_ids = np.repeat(bench.val_ids, kv)
    val_idx = np.tile(np.arange(kv), bench.val_identities)
    rows = bench.pair_list()

    def rendered(ids, idx):
        for chunk in iter_render(gen, ids, idx, encoded=True, workers=workers):
            if progress is not None:
                progress(len(chunk))
            yield from chunk

    if fmt == "folder":
        for sub, ids, idx in (("train", train_ids, train_idx), ("verify", val_ids, val_idx)):
            for identity in np.unique(ids):
                (root / sub / f"{identity:05d}").mkdir(parents=True)
            for i, j, data in zip(ids, idx, rendered(ids, idx)):
                (root / sub / f"{i:05d}" / f"{j:04d}.jpg").write_bytes(data)
        write_pairs_tsv(root / "pairs.tsv", [(f"verify/{a:05d}/{ia:04d}.jpg", f"verify/{b:05d}/{ib:04d}.jpg", s)
                                             for a, ia, b, ib, s in rows])
    else:
        recordio.write_insightface_rec(root, rendered(train_ids, train_idx), train_ids - bench.train_ids[0])
        # Only the held-out images that pairs use go into the .bin (each pair stores both).
        val = dict(zip(zip(val_ids.tolist(), val_idx.tolist()), rendered(val_ids, val_idx)))
        bins = []
        for a, ia, b, ib, _ in rows:
            bins += [val[(a, ia)], val[(b, ib)]]
        write_bin(root / "synthetic.bin", bins, rows[:, 4].astype(bool))
    return {
        "generator": "toolchain.data.synthetic",
        "format_version": FORMAT_VERSION,
        "format": fmt,
        **bench.to_dict(),
        "val_offset": bench.val_offset,
        "train_images": int(len(train_ids)),
        "val_images": int(len(val_ids)),
        "matched_pairs": int(rows[:, 4].sum()),
    }
