"""Export float models to ExecuTorch (.pte, XNNPACK) and TFLite (onnx2tf or litert-torch),
int8 and fp32, with embedded metadata and an export manifest."""

from toolchain.export.api import FORMATS, PRECISIONS, TFLITE_BACKENDS, export_model, resolve_source
from toolchain.runtime.manifest import MANIFEST_NAME, ArtifactRecord, read_manifest
from toolchain.runtime.metadata import read_embedded_metadata

__all__ = ["ArtifactRecord", "FORMATS", "MANIFEST_NAME", "PRECISIONS", "TFLITE_BACKENDS", "export_model",
           "read_embedded_metadata", "read_manifest", "resolve_source"]
