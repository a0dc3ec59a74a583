"""Image folders (one folder per identity) and this toolchain's pairs list, `pairs.tsv`.

Identity folder: ROOT/<identity>/<image>.(jpg|jpeg|png|bmp); identities are the sub-folders in
sorted order (label = position), images sorted by name.

pairs.tsv: UTF-8 lines `path_a<TAB>path_b<TAB>issame` (issame 1 or 0), paths relative to the
folder holding pairs.tsv; blank lines and lines starting with '#' are ignored. Any folder of
aligned crops can be given pairs this way; the synthetic writer uses it for held-out pairs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolchain.data.codec import decode_image
from toolchain.data.pairs import VerificationPairs
from toolchain.errors import ToolchainError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}


def scan_identity_folder(root) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels, identity names) of a one-folder-per-identity tree."""
    r = Path(root)
    if not r.is_dir():
        raise ToolchainError(f"{r}: not a folder")
    names = sorted(d.name for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(names):
        files = sorted(f for f in (r / name).iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise ToolchainError(f"{r}: no identity folders with images (expected ROOT/<identity>/<image>.jpg)")
    return paths, np.asarray(labels, dtype=np.int64), names


def read_image_file(path) -> np.ndarray:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ToolchainError(f"{p}: cannot read ({exc.strerror})") from None
    return decode_image(data, str(p))


def parse_pairs_tsv(path) -> tuple[list[Path], list[Path], np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise ToolchainError(f"{p}: no such file")
    base = p.parent
    a, b, same = [], [], []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise ToolchainError(f"{p.name}: line {n} is not 'path_a<TAB>path_b<TAB>0|1': {line[:80]!r}")
        pa, pb = base / parts[0], base / parts[1]
        for q in (pa, pb):
            if not q.is_file():
                raise ToolchainError(f"{p.name}: line {n} names a missing image {q}")
        a.append(pa)
        b.append(pb)
        same.append(parts[2] == "1")
    if not same:
        raise ToolchainError(f"{p}: no pairs")
    return a, b, np.asarray(same, dtype=bool)


def read_pair_images(a: list[Path], b: list[Path], progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode both sides of a pair list; an image named by several pairs is read once."""
    cache: dict[Path, np.ndarray] = {}

    def load(q: Path) -> np.ndarray:
        if q not in cache:
            cache[q] = read_image_file(q)
            if progress is not None:
                progress(1)
        return cache[q]

    return np.stack([load(q) for q in a]), np.stack([load(q) for q in b])


def read_pairs_tsv(path, progress=None) -> VerificationPairs:
    a, b, same = parse_pairs_tsv(path)
    ia, ib = read_pair_images(a, b, progress)
    p = Path(path)
    name = p.parent.name or "pairs"
    return VerificationPairs(ia, ib, same, name=name)


def write_pairs_tsv(path, rows) -> None:
    """rows: (relative path a, relative path b, issame)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# path_a\tpath_b\tissame (paths relative to this file)\n")
        for pa, pb, s in rows:
            f.write(f"{pa}\t{pb}\t{int(bool(s))}\n")
    os.replace(tmp, p)
