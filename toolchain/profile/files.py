"""Size and digest of an exported artifact (.tflite, .pte, or any file)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from toolchain.errors import ToolchainError
from toolchain.formats import check_identifier

# Suffixes the CLI treats as artifacts rather than model names.
ARTIFACT_SUFFIXES = (".tflite", ".pte", ".onnx", ".pt", ".pth", ".bin")
_FORMATS = {".tflite": "tflite", ".pte": "executorch", ".onnx": "onnx"}


def profile_file(path: str | os.PathLike) -> dict:
    """{'path', 'format', 'bytes', 'sha256'} of an existing regular file."""
    p = Path(path)
    if not p.exists():
        raise ToolchainError(f"file not found: {p}")
    if not p.is_file():
        raise ToolchainError(f"not a regular file: {p}")
    check_identifier(p)
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "path": str(p),
        "format": _FORMATS.get(p.suffix.lower(), p.suffix.lower().lstrip(".") or "unknown"),
        "bytes": p.stat().st_size,
        "sha256": digest.hexdigest(),
    }
