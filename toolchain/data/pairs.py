"""Verification pairs in memory: what every pair reader returns (toolchain.data.pair_files
picks the reader)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from toolchain.errors import ToolchainError


@dataclass
class VerificationPairs:
    """N pairs of (112,112,3) uint8 images and whether each pair shows one identity."""

    images_a: np.ndarray
    images_b: np.ndarray
    issame: np.ndarray
    name: str = "pairs"
    # The person of each side a and b, where the pair file came with them (a pair_identities.json
    # beside it, as the toolchain writes for synthetic and folder data); None otherwise.
    identities: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self):
        self.issame = np.asarray(self.issame, dtype=bool)
        n = len(self.issame)
        for attr in ("images_a", "images_b"):
            arr = getattr(self, attr)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != n or arr.shape[-1] != 3:
                raise ToolchainError(f"{self.name}: {attr} must be ({n},H,W,3) uint8, got {arr.shape} {arr.dtype}")
        if self.identities is not None:
            ids = tuple(np.asarray(side, dtype=np.int64).reshape(-1) for side in self.identities)
            if any(len(side) != n for side in ids):
                raise ToolchainError(f"{self.name}: identities of {[len(x) for x in ids]} pair sides for {n} pairs")
            if np.any((ids[0] == ids[1]) != self.issame):
                raise ToolchainError(f"{self.name}: the pair identities disagree with issame")
            self.identities = ids

    def __len__(self) -> int:
        return len(self.issame)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images_a.shape[1:3])

    def distinct(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, index_a, index_b): each distinct image once, in first-seen order, and where each
        pair's a and b images are in it. Pairs reuse images (the synthetic 1,200 pairs hold 902
        distinct ones), so a runtime that embeds `images` does a third less work or more."""
        seen: dict[bytes, int] = {}
        order: list[np.ndarray] = []
        index = np.empty(2 * len(self), dtype=np.int64)
        for k, img in enumerate(im for pair in zip(self.images_a, self.images_b) for im in pair):
            key = hashlib.sha1(img.tobytes()).digest()
            if key not in seen:
                seen[key] = len(order)
                order.append(img)
            index[k] = seen[key]
        images = np.stack(order) if order else self.images_a[:0]
        return images, index[0::2], index[1::2]

    def distinct_identities(self, index_a: np.ndarray, index_b: np.ndarray, count: int) -> np.ndarray | None:
        """The person of each of `count` distinct images (`distinct()`'s indices), or None."""
        if self.identities is None:
            return None
        ids = np.full(count, -1, dtype=np.int64)
        ids[index_a], ids[index_b] = self.identities
        return ids

    def subset(self, n: int) -> "VerificationPairs":
        """The first n pairs (keeps the fold layout only when n is a multiple of the fold size)."""
        ids = None if self.identities is None else (self.identities[0][:n], self.identities[1][:n])
        return VerificationPairs(self.images_a[:n], self.images_b[:n], self.issame[:n], self.name, ids)
