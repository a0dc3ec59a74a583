"""Image bytes <-> uint8 arrays (Pillow), with one-line errors naming the culprit."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from toolchain.errors import ToolchainError

SIZE = 112


def decode_image(data, what: str = "image", size: int = SIZE) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to (size, size, 3) uint8 RGB.

    Crops are expected to be aligned already; an image of another size is resized (bilinear),
    which is all the loaders do: align faces before loading them.
    """
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()  # decode now: a truncated JPEG fails here, not later
            if im.mode != "RGB":
                im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns otherwise)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ToolchainError(f"{what}: undecodable image ({exc})") from None
    return arr


def image_size(data, what: str = "image") -> tuple[int, int]:
    """(width, height) of encoded image bytes, after a full decode (so corruption is caught)."""
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ToolchainError(f"{what}: undecodable image ({exc})") from None


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode one (H,W,3) uint8 RGB array as JPEG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ToolchainError(f"expected an (H,W,3) uint8 image, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()
