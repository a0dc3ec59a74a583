"""Verification pairs and the readers of every pair format.

`load_pairs(path)` dispatches on what `path` is:
- an insightface `.bin` (a restricted unpickler reads it, see insightface_bin.py);
- an LFW root (holding `pairs.txt` and `lfw/`) or a `pairs.txt` beside `lfw/`;
- a folder-format root holding `pairs.tsv` (this toolchain's list, see folder.py), or the
  `pairs.tsv` itself;
- a folder holding exactly one `.bin` (an insightface data folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError


@dataclass
class VerificationPairs:
    """N pairs of (112,112,3) uint8 images and whether each pair shows one identity."""

    images_a: np.ndarray
    images_b: np.ndarray
    issame: np.ndarray
    name: str = "pairs"

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool)
        n = len(self.issame)
        for attr in ("images_a", "images_b"):
            arr = getattr(self, attr)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != n or arr.shape[-1] != 3:
                raise ToolchainError(f"{self.name}: {attr} must be ({n},H,W,3) uint8, got {arr.shape} {arr.dtype}")

    def __len__(self) -> int:
        return len(self.issame)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images_a.shape[1:3])

    def subset(self, n: int) -> "VerificationPairs":
        """The first n pairs (keeps the fold layout only when n is a multiple of the fold size)."""
        return VerificationPairs(self.images_a[:n], self.images_b[:n], self.issame[:n], self.name)


def load_pairs(path) -> VerificationPairs:
    """Read verification pairs from a .bin, an LFW root / pairs.txt, or a pairs.tsv folder."""
    p = Path(path)
    if not p.exists():
        raise ToolchainError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix == ".bin":
            from toolchain.data.insightface_bin import read_bin

            return read_bin(p)
        if p.name == "pairs.tsv":
            from toolchain.data.folder import read_pairs_tsv

            return read_pairs_tsv(p)
        if p.suffix == ".txt":
            from toolchain.data.lfw import read_lfw

            return read_lfw(p.parent, pairs_file=p)
        raise ToolchainError(f"{p}: not a pairs file (.bin, LFW pairs.txt or pairs.tsv)")
    if (p / "pairs.tsv").is_file():
        from toolchain.data.folder import read_pairs_tsv

        return read_pairs_tsv(p / "pairs.tsv")
    if (p / "pairs.txt").is_file():
        from toolchain.data.lfw import read_lfw

        return read_lfw(p)
    bins = sorted(p.glob("*.bin"))
    if len(bins) == 1:
        from toolchain.data.insightface_bin import read_bin

        return read_bin(bins[0])
    if len(bins) > 1:
        raise ToolchainError(f"{p}: holds several .bin files ({', '.join(b.name for b in bins)}); name one")
    raise ToolchainError(f"{p}: no verification pairs found (expected a .bin, pairs.txt with lfw/, or pairs.tsv)")
