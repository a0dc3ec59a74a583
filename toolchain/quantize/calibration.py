"""Calibration sets for static int8: real images of the kind the model will see.

- verifier (a per-user model): the user's enrollment images plus negatives (other people), so
  the activation ranges cover both sides of the decision;
- backbone: identity images (faces of many people).
The result is uint8 NHWC, deterministic for a seed, at most `size` images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.runtime.preprocess import check_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_images(path: str | Path, hw: Sequence[int] | None = None) -> np.ndarray:
    """Read uint8 NHWC images from `.npy`, `.npz` (key `images`, else the only 4-D array),
    a folder of image files (recursive), or a verification-pairs file (both sides)."""
    path = Path(path)
    if not path.exists():
        raise ToolchainError(f"calibration data {path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ToolchainError(f"calibration data {path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        from PIL import Image

        imgs = []
        for f in files:
            try:
                with Image.open(f) as im:
                    imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except Exception as exc:  # noqa: BLE001 - unreadable image: name it
                raise ToolchainError(f"calibration image {f}: unreadable ({exc})") from exc
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise ToolchainError(f"calibration data {path}: images of different sizes {sorted(shapes)[:3]}")
        arr = np.stack(imgs)
    elif path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise ToolchainError(f"calibration data {path}: not a readable .npy ({exc})") from exc
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "images" in z.files:
                    arr = z["images"]
                else:
                    cands = [k for k in z.files if z[k].ndim == 4]
                    if len(cands) != 1:
                        raise ToolchainError(f"calibration data {path}: no 'images' array")
                    arr = z[cands[0]]
        except ToolchainError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ToolchainError(f"calibration data {path}: not a readable .npz ({exc})") from exc
    else:
        try:
            from toolchain.data import load_pairs
        except ImportError as exc:
            raise ToolchainError(f"calibration data {path}: unsupported file type {path.suffix!r}") from exc
        pairs = load_pairs(path)
        arr = np.concatenate([pairs.images_a, pairs.images_b], axis=0)
    return check_images(arr, hw, what=f"calibration data {path}")


def _as_images(x, hw, what) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, (str, Path)):
        return load_images(x, hw)
    return check_images(x, hw, what=what)


def _sample(rng: np.random.Generator, images: np.ndarray, n: int) -> np.ndarray:
    if n <= 0:
        return images[:0]
    if n >= len(images):
        return images
    return images[np.sort(rng.choice(len(images), n, replace=False))]


def build_calibration_set(kind: str = "backbone", *, images=None, enrollment=None, negatives=None,
                          size: int = 128, seed: int = 0,
                          image_size: Sequence[int] = (112, 112)) -> np.ndarray:
    """A uint8 NHWC calibration set of at most `size` images.

    kind "verifier": every enrollment image (up to half the set, mirrored copies added when
    there are few) plus negatives filling the rest. kind "backbone": a sample of `images`
    (identity images). Arrays or paths (see `load_images`) are accepted. Missing or empty
    data raises ToolchainError; so do images of the wrong size.
    """
    if size < 1:
        raise ToolchainError(f"calibration size must be >= 1, got {size}")
    rng = np.random.default_rng(seed)
    hw = tuple(image_size)
    if kind == "verifier":
        pos = _as_images(enrollment if enrollment is not None else images, hw, "enrollment images")
        neg = _as_images(negatives, hw, "negative images")
        if pos is None or neg is None:
            missing = " and ".join(n for n, v in (("enrollment images", pos), ("negatives", neg)) if v is None)
            raise ToolchainError(f"verifier calibration needs enrollment images and negatives; missing {missing}")
        # A single enrollment image is common: its mirror is as valid a view of the user.
        if len(pos) < max(1, size // 4):
            pos = np.concatenate([pos, pos[:, :, ::-1]], axis=0)
        n_pos = min(len(pos), max(1, size // 2))
        chosen = np.concatenate([_sample(rng, pos, n_pos), _sample(rng, neg, size - n_pos)], axis=0)
    elif kind == "backbone":
        imgs = _as_images(images, hw, "identity images")
        if imgs is None:
            raise ToolchainError("backbone calibration needs identity images (none given)")
        chosen = _sample(rng, imgs, size)
    else:
        raise ToolchainError(f"unknown calibration kind {kind!r} (verifier or backbone)")
    return np.ascontiguousarray(chosen)


def identity_calibration_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Which of `n` identity images identity_calibration_set draws (sorted)."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, size), replace=False))


def identity_calibration_set(dataset, size: int, seed: int) -> np.ndarray:
    """An embedding model's calibration images: `size` images of an identity dataset (anything
    with len() and get_uint8(i)), drawn without replacement with `seed`, as the recipes' export
    draws them."""
    pick = identity_calibration_indices(len(dataset), size, seed)
    return build_calibration_set("backbone", images=np.stack([dataset.get_uint8(int(i)) for i in pick]),
                                 size=size, seed=seed)
