"""Enrollment: enrollment image(s) of a user -> that user's verifier f(.; theta_u) + threshold.

- Each image (112x112 RGB aligned crop, uint8 HWC) is embedded by h_bb as in training: the image
  plus its mirror, summed and L2-normalised.
- Several images: their normalised embeddings are averaged and normalised again before h_gen
  (one theta from the mean identity direction; averaging embeddings rather than thetas keeps the
  result a head that h_gen was trained to emit).
- Threshold: the global one calibrated on held-out identities at the end of hypernet training
  (stored in the hypernet checkpoint; rule "logit >= threshold"). No per-user adjustment: with one
  enrollment image there is nothing to adjust it on, and the held-out calibration already
  reflects single-image enrollment.
- Output (toolchain.models.io.save_enrollment): `verifier.pt` (plain state dict of the `verifier`
  model: shared trunk + this user's head) and `enrollment.json` (model kwargs, threshold, user,
  number of images, hypernet provenance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from toolchain.errors import ToolchainError
from toolchain.models.hypernet import HypernetBundle, load_hypernet
from toolchain.models.io import save_enrollment
from toolchain.models.inputs import embed, nhwc_uint8_to_input
from toolchain.train.common import one_intraop_thread, progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _as_bundle(hypernet: str | Path | HypernetBundle) -> HypernetBundle:
    return hypernet if isinstance(hypernet, HypernetBundle) else load_hypernet(hypernet)


def _check_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[3] != 3 or tuple(images.shape[1:3]) != size:
        raise ToolchainError(f"enrollment images must be uint8 (N,{size[0]},{size[1]},3) aligned crops, "
                             f"got shape {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise ToolchainError(f"enrollment images must be uint8, got {images.dtype}")
    if len(images) == 0:
        raise ToolchainError("no enrollment image given")
    return images


@torch.no_grad()
def user_theta(bundle: HypernetBundle, images: np.ndarray) -> dict[str, torch.Tensor]:
    """Generated head of one user from uint8 (N,H,W,3) enrollment images (see module docstring)."""
    spec = getattr(bundle.backbone, "spec", None)
    size = tuple(spec.input_size[1:]) if spec is not None else (112, 112)
    images = _check_images(images, size)
    with one_intraop_thread():  # the same floats, so the same files, whatever the core count
        e = embed(bundle.embedder, nhwc_uint8_to_input(images), flip=bundle.flip)
        mean = F.normalize(e.mean(0, keepdim=True), dim=1)
        theta = bundle.hypernet(mean)
    return {k: v[0] for k, v in theta.items()}


def enroll_images(hypernet_ckpt: str | Path | HypernetBundle, images: np.ndarray, out_dir: str | Path,
                  user: str | None = None) -> Path:
    """Write `out_dir/verifier.pt` + `out_dir/enrollment.json` for one user; returns out_dir."""
    bundle = _as_bundle(hypernet_ckpt)
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    theta = user_theta(bundle, images)  # checks the images
    verifier = bundle.hypernet.build_verifier(theta)
    source = None if isinstance(hypernet_ckpt, HypernetBundle) else str(hypernet_ckpt)
    calibration = bundle.meta.get("calibration", {})
    return save_enrollment(
        out_dir, verifier, bundle.hypernet.verifier_kwargs, bundle.threshold,
        user=user if user is not None else Path(out_dir).name, num_images=int(len(images)),
        hypernet=source, hypernet_sha256=bundle.sha256, backbone=bundle.meta["backbone"]["model"],
        threshold_source="held-out identities at hypernet training (max balanced accuracy)",
        calibration={k: calibration[k] for k in ("balanced_accuracy", "auc", "eer", "identities") if k in calibration},
    )


def read_image(path: str | Path, hw=None) -> np.ndarray:
    """An aligned face crop file -> uint8 (H,W,3) RGB; with `hw` (height, width), a crop of
    another size is refused."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: no such image")
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ToolchainError(f"{path}: not a readable image ({exc})") from exc
    if hw is not None and tuple(img.shape[:2]) != tuple(hw):
        raise ToolchainError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected an aligned "
                             f"{hw[1]}x{hw[0]} crop")
    return img


def read_images(paths) -> np.ndarray:
    images = [read_image(p) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ToolchainError(f"enrollment images differ in size: {sorted(shapes)}")
    return np.stack(images)


def enroll_folder(hypernet_ckpt: str | Path, users_dir: str | Path, out_dir: str | Path,
                  progress: bool = True) -> list[Path]:
    """Batch mode: every sub-folder of `users_dir` is one user (its images are the enrollment
    images); writes `out_dir/<user>/`. Returns the user folders written."""
    users_dir, out_dir = Path(users_dir), Path(out_dir)
    if not users_dir.is_dir():
        raise ToolchainError(f"{users_dir}: not a folder of user sub-folders")
    users = sorted(d for d in users_dir.iterdir() if d.is_dir())
    if not users:
        raise ToolchainError(f"{users_dir}: holds no user sub-folder")
    bundle = load_hypernet(hypernet_ckpt)
    written = []
    with progress_bar("enrolling", len(users), enabled=progress) as advance:
        for user_dir in users:
            files = sorted(f for f in user_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ToolchainError(f"{user_dir}: no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            enroll_images(bundle, read_images(files), out_dir / user_dir.name, user=user_dir.name)
            written.append(out_dir / user_dir.name)
            advance(1, user=user_dir.name)
    return written
