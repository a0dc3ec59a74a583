"""LFW's `pairs.txt` with its `lfw/` image tree.

pairs.txt: first line `n_sets<TAB>n_per_set` (LFW: 10, 300); then for each set n_per_set matched
lines `name<TAB>n1<TAB>n2` followed by n_per_set mismatched lines `name1<TAB>n1<TAB>name2<TAB>n2`.
Images are ROOT/lfw/<name>/<name>_<n:04d>.jpg. The loader expects aligned 112x112 crops (align
raw LFW first); any other size is resized, nothing more.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolchain.data.folder import read_pair_images
from toolchain.data.pairs import VerificationPairs
from toolchain.errors import ToolchainError


def _image_path(images: Path, name: str, num: str, where: str) -> Path:
    try:
        n = int(num)
    except ValueError:
        raise ToolchainError(f"{where}: image number {num!r} is not an integer") from None
    return images / name / f"{name}_{n:04d}.jpg"


def parse_lfw_pairs(root, pairs_file=None) -> tuple[list[Path], list[Path], np.ndarray]:
    """(paths a, paths b, issame) of an LFW root; every named image must exist."""
    r = Path(root)
    pf = Path(pairs_file) if pairs_file is not None else r / "pairs.txt"
    if not pf.is_file():
        raise ToolchainError(f"{pf}: no such file")
    images = r / "lfw"
    if not images.is_dir():
        raise ToolchainError(f"{r}: no lfw/ folder beside {pf.name}")
    lines = [ln for ln in pf.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise ToolchainError(f"{pf}: empty")
    head = lines[0].split()
    try:
        n_sets, n_per = (int(x) for x in head)
    except ValueError:
        raise ToolchainError(f"{pf.name}: first line must be 'n_sets<TAB>n_per_set', got {lines[0][:40]!r}") from None
    body = lines[1:]
    if len(body) != 2 * n_sets * n_per:
        raise ToolchainError(f"{pf.name}: {len(body)} pair lines, header announces {2 * n_sets * n_per}")
    a, b, same = [], [], []
    for k, line in enumerate(body):
        where = f"{pf.name} line {k + 2}"
        parts = line.split()
        matched = (k // n_per) % 2 == 0
        if matched and len(parts) == 3:
            pa = _image_path(images, parts[0], parts[1], where)
            pb = _image_path(images, parts[0], parts[2], where)
        elif not matched and len(parts) == 4:
            pa = _image_path(images, parts[0], parts[1], where)
            pb = _image_path(images, parts[2], parts[3], where)
        else:
            kind = "matched 'name n1 n2'" if matched else "mismatched 'name1 n1 name2 n2'"
            raise ToolchainError(f"{where}: expected a {kind} line, got {line[:80]!r}")
        for q in (pa, pb):
            if not q.is_file():
                raise ToolchainError(f"{where}: names a missing image {q.relative_to(r)}")
        a.append(pa)
        b.append(pb)
        same.append(matched)
    return a, b, np.asarray(same, dtype=bool)


def read_lfw(root, pairs_file=None, progress=None) -> VerificationPairs:
    a, b, same = parse_lfw_pairs(root, pairs_file)
    ia, ib = read_pair_images(a, b, progress)
    return VerificationPairs(ia, ib, same, name="lfw")


def write_lfw(root, matched, mismatched, jpegs: dict, n_sets: int = 10) -> None:
    """Write an LFW-layout tree (for tests and for exporting pairs to LFW-style tools).

    matched: [(name, n1, n2)], mismatched: [(name1, n1, name2, n2)], each of length
    n_sets * n_per (set s is matched[s*n_per:(s+1)*n_per] then mismatched likewise);
    jpegs: {(name, n): bytes} for every image named.
    """
    r = Path(root)
    if len(matched) != len(mismatched) or len(matched) % n_sets:
        raise ToolchainError("matched and mismatched must have the same length, a multiple of n_sets")
    n_per = len(matched) // n_sets
    for (name, n), data in jpegs.items():
        d = r / "lfw" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}_{int(n):04d}.jpg").write_bytes(data)
    lines = [f"{n_sets}\t{n_per}"]
    for s in range(n_sets):
        lines += ["\t".join(map(str, m)) for m in matched[s * n_per:(s + 1) * n_per]]
        lines += ["\t".join(map(str, m)) for m in mismatched[s * n_per:(s + 1) * n_per]]
    tmp = r / "pairs.txt.partial"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, r / "pairs.txt")
