"""The metadata every exported artifact carries, and how it is read back from the file.

One JSON object (schema `toolchain.artifact/1`) holds what an app needs: input layout, shape,
dtype, normalisation, the input/output quantisation, the decision threshold of a verifier, the
model name, the output kind and the tool versions. Where it lives inside the file:
- ExecuTorch `.pte`: constant methods. `metadata_json` returns the whole object as a string;
  typed copies of the essentials (`input_shape`, `input_mean`, `input_std`, `threshold`,
  `input_scale`, `input_zero_point`, `output_scale`, `output_zero_point`) serve C++ apps that
  do not parse JSON.
- TFLite `.tflite`: a `Model.metadata` entry named `toolchain_metadata` whose buffer holds
  the JSON bytes (the flatbuffer schema's own mechanism; interpreters ignore unknown entries).
"""

from __future__ import annotations

import json
from pathlib import Path

from toolchain.errors import ToolchainError
from toolchain.formats import check_identifier

SCHEMA = "toolchain.artifact/1"
TFLITE_METADATA_NAME = "toolchain_metadata"
PTE_METADATA_METHOD = "metadata_json"


def artifact_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".pte":
        return "executorch"
    if suffix == ".tflite":
        return "tflite"
    raise ToolchainError(f"{path}: unknown artifact format (expected .pte or .tflite)")


def read_tflite_metadata_entries(buf: bytes) -> dict[str, bytes]:
    """All Model.metadata entries of a TFLite flatbuffer, name -> buffer bytes."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(buf, 0)
        out = {}
        for i in range(model.MetadataLength()):
            md = model.Metadata(i)
            name = md.Name().decode("utf-8", "replace") if md.Name() else ""
            data = model.Buffers(md.Buffer())
            raw = data.DataAsNumpy() if data is not None and data.DataLength() > 0 else b""
            if data is not None and data.DataLength() == 0 and data.Offset() > 0:
                raw = buf[data.Offset():data.Offset() + data.Size()]  # >2 GB layout, data outside
            out[name] = bytes(raw) if not isinstance(raw, int) else b""
        return out
    except Exception as exc:  # noqa: BLE001 - corrupt file: one line
        raise ToolchainError(f"not a readable TFLite flatbuffer ({type(exc).__name__}: {exc})") from exc


def _read_pte_metadata(path: Path) -> dict:
    from executorch.runtime import Runtime

    check_identifier(path)
    try:
        program = Runtime.get().load_program(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ToolchainError(f"{path}: not a loadable ExecuTorch program ({exc})".splitlines()[0]) from exc
    if PTE_METADATA_METHOD not in program.method_names:
        return {}
    value = program.load_method(PTE_METADATA_METHOD).execute([])
    text = value[0] if isinstance(value, (list, tuple)) else value
    return json.loads(text)


def read_embedded_metadata(path: str | Path) -> dict:
    """The toolchain metadata stored inside an artifact; {} when the file carries none."""
    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: no such file")
    fmt = artifact_format(path)
    check_identifier(path)
    if fmt == "executorch":
        return _read_pte_metadata(path)
    entries = read_tflite_metadata_entries(path.read_bytes())
    if TFLITE_METADATA_NAME not in entries:
        return {}
    try:
        return json.loads(entries[TFLITE_METADATA_NAME].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolchainError(f"{path}: corrupt {TFLITE_METADATA_NAME} entry ({exc})") from exc
