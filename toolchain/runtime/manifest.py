"""`export_manifest.json`: every artifact of an export with its digest, size and provenance."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolchain.errors import ToolchainError

MANIFEST_NAME = "export_manifest.json"
MANIFEST_SCHEMA = "toolchain.export/1"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ArtifactRecord:
    file: str  # name inside the output folder
    path: str  # absolute path
    format: str  # "executorch" | "tflite"
    precision: str  # "int8" | "fp32"
    backend: str  # "xnnpack" | "onnx2tf" | "litert-torch"
    bytes: int
    sha256: str
    model: str
    output: str
    input_shape: list[int]
    input_layout: str
    input_dtype: str
    threshold: float | None = None
    checks: dict = field(default_factory=dict)  # delegation report / int8 flatbuffer check
    export_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ToolchainError(f"{path}: no export manifest")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolchainError(f"{path}: invalid JSON ({exc})") from exc
    if data.get("schema") != MANIFEST_SCHEMA:
        raise ToolchainError(f"{path}: not an export manifest (schema {data.get('schema')!r})")
    return data


def find_manifest_for(artifact: str | Path) -> tuple[dict, dict] | None:
    """(manifest, artifact entry) for an artifact file, from the manifest beside it."""
    artifact = Path(artifact)
    path = artifact.parent / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = read_manifest(artifact.parent)
    except ToolchainError:
        return None
    for entry in data.get("artifacts", []):
        if entry.get("file") == artifact.name:
            return data, entry
    return None
