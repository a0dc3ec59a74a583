"""`toolchain data inspect`: what a data path holds, checked end to end.

Every record is walked and every image decoded (or the first `max_images`), so a truncated
record, a bad magic, a missing .idx, a pair naming a missing image or an undecodable JPEG is
reported as a ToolchainError naming the culprit.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from toolchain.data import recordio
from toolchain.data.codec import image_size
from toolchain.data.folder import IMAGE_EXTS, parse_pairs_tsv, scan_identity_folder
from toolchain.data.insightface_bin import read_bin_raw
from toolchain.data.lfw import parse_lfw_pairs
from toolchain.errors import ToolchainError


class _Sizes:
    def __init__(self, max_images: int | None, progress=None):
        self.counts: Counter = Counter()
        self.max_images = max_images
        self.checked = 0
        self.progress = progress

    def add(self, data, what: str) -> None:
        if self.max_images is not None and self.checked >= self.max_images:
            return
        self.counts[image_size(data, what)] += 1
        self.checked += 1
        if self.progress is not None:
            self.progress(1)

    def add_file(self, path: Path) -> None:
        if self.max_images is not None and self.checked >= self.max_images:
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ToolchainError(f"{path}: cannot read ({exc.strerror})") from None
        self.add(data, str(path))

    def describe(self) -> str:
        if not self.counts:
            return "-"
        return ", ".join(f"{w}x{h}" + (f" ({n})" if len(self.counts) > 1 else "")
                         for (w, h), n in self.counts.most_common())


def _inspect_bin(p: Path, sizes: _Sizes) -> dict:
    bins, issame = read_bin_raw(p)
    for k, b in enumerate(bins):
        sizes.add(b, f"{p.name}: image {k}")
    return {"format": "insightface .bin", "identities": None, "images": len(bins), "pairs": len(issame),
            "matched_pairs": int(issame.sum())}


def _inspect_rec(path: Path, sizes: _Sizes) -> dict:
    rec_path, idx_path, prop_path = recordio.resolve_rec(path)
    if not idx_path.is_file():
        raise ToolchainError(f"{idx_path}: missing .idx (RecordIO needs the index beside {rec_path.name})")
    offsets = recordio.read_idx(idx_path)
    headers = {}
    for off, rec in recordio.iter_records(rec_path):
        headers[off] = recordio.unpack(rec, f"{rec_path.name} at offset {off}")
    for key, off in offsets.items():
        if off not in headers:
            raise ToolchainError(f"{idx_path.name}: key {key} points to offset {off}, which starts no record")
    h0 = headers.get(offsets.get(0, -1))
    labels = []
    if h0 is not None and h0[0].flag > 0:
        id_start, id_end = (int(v) for v in np.asarray(h0[0].label)[:2])
        image_keys = [k for k in range(1, id_start)]
        identities = id_end - id_start
    else:
        image_keys = sorted(offsets)
        identities = None
    for key in image_keys:
        if key not in offsets:
            raise ToolchainError(f"{idx_path.name}: image key {key} is missing")
        h, body = headers[offsets[key]]
        labels.append(int(h.label if h.flag == 0 else np.asarray(h.label)[0]))
        sizes.add(body, f"{rec_path.name} key {key}")
    if identities is None:
        identities = len(set(labels))
    prop = recordio.read_property(prop_path)
    if prop is not None and prop[0] != identities:
        raise ToolchainError(f"{prop_path}: says {prop[0]} classes, the records hold {identities}")
    out = {"format": "RecordIO", "identities": identities, "images": len(image_keys), "pairs": 0,
           "matched_pairs": 0}
    for b in sorted(rec_path.parent.glob("*.bin")) if path.is_dir() else []:
        sub = _inspect_bin(b, sizes)
        out["pairs"] += sub["pairs"]
        out["matched_pairs"] += sub["matched_pairs"]
        out.setdefault("bins", []).append(b.name)
    return out


def _inspect_lfw(root: Path, pairs_file: Path | None, sizes: _Sizes) -> dict:
    a, b, same = parse_lfw_pairs(root, pairs_file)
    people = [d for d in (root / "lfw").iterdir() if d.is_dir()]
    files = [f for d in people for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS]
    for f in sorted(set(a) | set(b)):
        sizes.add_file(f)
    return {"format": "LFW pairs.txt", "identities": len(people), "images": len(files), "pairs": len(same),
            "matched_pairs": int(same.sum())}


def _inspect_tsv(tsv: Path, sizes: _Sizes) -> dict:
    a, b, same = parse_pairs_tsv(tsv)
    out = {"format": "image folders + pairs.tsv", "identities": None, "images": 0, "pairs": len(same),
           "matched_pairs": int(same.sum())}
    train = tsv.parent / "train"
    if train.is_dir():
        paths, labels, names = scan_identity_folder(train)
        out["identities"], out["images"] = len(names), len(paths)
        for f in paths:
            sizes.add_file(f)
    for f in sorted(set(a) | set(b)):
        sizes.add_file(f)
    return out


def inspect_path(path, max_images: int | None = None, progress=None) -> dict:
    """Summary of a data path: format, identities, images, pairs, matched_pairs, image_size."""
    p = Path(path)
    if not p.exists():
        raise ToolchainError(f"{p}: no such file or folder")
    sizes = _Sizes(max_images, progress)
    if p.is_file():
        if p.suffix == ".bin":
            out = _inspect_bin(p, sizes)
        elif p.suffix in (".rec", ".idx"):
            out = _inspect_rec(p.with_suffix(".rec"), sizes)
        elif p.name == "pairs.tsv":
            out = _inspect_tsv(p, sizes)
        elif p.suffix == ".txt":
            out = _inspect_lfw(p.parent, p, sizes)
        else:
            raise ToolchainError(f"{p}: unknown data file (expected .bin, .rec, pairs.txt or pairs.tsv)")
    elif any(p.glob("*.rec")):
        out = _inspect_rec(p, sizes)
    elif (p / "pairs.tsv").is_file():
        out = _inspect_tsv(p / "pairs.tsv", sizes)
    elif (p / "pairs.txt").is_file():
        out = _inspect_lfw(p, None, sizes)
    elif (p / "train.idx").is_file():
        raise ToolchainError(f"{p}: train.idx without train.rec")
    elif len(list(p.glob("*.bin"))) == 1:
        out = _inspect_bin(next(p.glob("*.bin")), sizes)
    else:
        paths, labels, names = scan_identity_folder(p)
        for f in paths:
            sizes.add_file(f)
        out = {"format": "image folders", "identities": len(names), "images": len(paths), "pairs": 0,
               "matched_pairs": 0}
    out["image_size"] = sizes.describe()
    out["images_decoded"] = sizes.checked
    out["path"] = str(p)
    return out
