"""Build the artifact metadata and write it into the file (readers: toolchain.runtime.metadata)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

from toolchain.errors import ToolchainError
from toolchain.runtime.metadata import PTE_METADATA_METHOD, SCHEMA, TFLITE_METADATA_NAME

_TOOLS = ("torch", "executorch", "torchao", "tensorflow-cpu", "ai-edge-litert", "onnx", "onnx2tf",
          "onnxsim", "litert-torch", "numpy")
# The tools that made (and check) each kind of artifact; the metadata inside a file lists only
# these, so a tiny model does not grow by a list of unrelated versions.
_TOOLS_BY_BACKEND = {
    "xnnpack": ("torch", "executorch", "torchao"),
    "onnx2tf": ("torch", "onnx", "onnx2tf", "tensorflow-cpu", "ai-edge-litert"),
    "litert-torch": ("torch", "litert-torch", "torchao", "ai-edge-litert"),
}


def tool_versions(backend: str | None = None) -> dict:
    from toolchain import __version__

    out = {"toolchain": __version__, "python": platform.python_version()}
    for name in (_TOOLS_BY_BACKEND.get(backend, _TOOLS) if backend else _TOOLS):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def backend_versions(versions: dict, backend: str) -> dict:
    """The versions of the tools that make `backend`'s files (and the toolchain's own)."""
    return {k: v for k, v in versions.items() if k == "toolchain" or k in _TOOLS_BY_BACKEND.get(backend, _TOOLS)}


def build_metadata(*, model_name: str, spec, fmt: str, precision: str, backend: str,
                   input_shape: list[int], layout: str, input_dtype: str,
                   input_quant: dict | None, output_quant: dict | None, output_dtype: str,
                   threshold: float | None, source: dict, versions: dict | None = None,
                   internal_quant: dict | None = None, user: str | None = None,
                   template: str | None = None) -> dict:
    meta = {
        "schema": SCHEMA,
        "model": model_name,
        "format": fmt,
        "precision": precision,
        "backend": backend,
        "output": spec.output,
        "output_dim": int(spec.output_dim),
        "input": {
            "layout": layout,
            "shape": [int(s) for s in input_shape],
            "dtype": input_dtype,
            "mean": [float(m) for m in spec.mean],
            "std": [float(s) for s in spec.std],
            "quantization": input_quant,
        },
        "output_tensor": {"dtype": output_dtype, "quantization": output_quant},
        "threshold": None if threshold is None else float(threshold),
        # Provenance in brief (the manifest holds full paths and digests): the verifier's int8
        # file has a 40 KB budget and every byte of metadata counts against it.
        "source": {k: (Path(v).name if k == "path" else v) for k, v in source.items() if k != "sha256"},
        "tool_versions": backend_versions(versions or tool_versions(), backend),
    }
    if user is not None:  # a verifier: whose it is, and the fleet template it can be written from
        meta["user"] = str(user)
        meta["template"] = template
    if internal_quant:
        # ExecuTorch int8 keeps float I/O; these are the quantise/dequantise steps inside the graph.
        meta["internal_quantization"] = internal_quant
    return meta


def compact_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


# A verifier's metadata is padded to a fixed size, so its place and length in the file never
# depend on the user and a fleet writes it in place (toolchain.fleet).
VERIFIER_METADATA_BYTES = 1024


def serialized_metadata(meta: dict) -> str:
    """The JSON written into a file: compact; a verifier's padded with spaces to a fixed size."""
    text = compact_json(meta)
    if meta.get("output") != "logit":
        return text
    if len(text.encode()) > VERIFIER_METADATA_BYTES:
        raise ToolchainError(f"verifier metadata is {len(text.encode())} bytes, more than the fixed "
                             f"{VERIFIER_METADATA_BYTES} (a user id of at most 64 characters fits)")
    return text + " " * (VERIFIER_METADATA_BYTES - len(text.encode()))


# Raised whenever the same inputs start to give different file bytes (2: onnx2tf's int8 .tflite is
# quantised with the recipe's calibration method), so templates cached by earlier code never match.
FILE_REVISION = 2


def template_id(*, hypernet_sha256: str | None, calibration_sha256: str | None, fmt: str, precision: str,
                versions: dict, model_kwargs: dict, int8=None) -> str | None:
    """Which template a verifier file can be written from (toolchain.fleet): the same hypernet,
    calibration set and int8 method (int8), format, precision and tool versions. None without the
    hypernet's hash. The default int8 method adds nothing to the key, so ids made before it was a
    choice still match."""
    if not hypernet_sha256:
        return None
    key = {"hypernet": hypernet_sha256, "calibration": calibration_sha256 if precision == "int8" else None,
           "format": fmt, "precision": precision, "model_kwargs": model_kwargs, "tools": versions,
           "revision": FILE_REVISION}
    if precision == "int8" and int8 is not None and not int8.is_default:
        key["int8"] = int8.to_dict()
    return hashlib.sha256(compact_json(key).encode()).hexdigest()[:16]


def pte_constant_methods(meta: dict) -> dict:
    """ExecuTorch constant methods: the whole JSON plus typed copies of the essentials.

    Every method costs 250-900 bytes in the program and the verifier's int8 file has a 40 KB
    budget, so the typed copies are few: `quant_params` (floats: input scale, input zero-point,
    output scale, output zero-point of the int8 region; zeros when float) and, for a verifier,
    `threshold`. The input shape and dtype need no copy: ExecuTorch's own MethodMeta of
    `forward` carries them. Mean/std and the rest are in `metadata_json`.
    """
    inp = meta["input"]
    q_in = inp.get("quantization") or (meta.get("internal_quantization") or {}).get("input") or {}
    q_out = (meta.get("output_tensor") or {}).get("quantization") or \
        (meta.get("internal_quantization") or {}).get("output") or {}
    methods = {
        PTE_METADATA_METHOD: serialized_metadata(meta),
        "quant_params": [float(q_in.get("scale", 0.0)), float(q_in.get("zero_point", 0)),
                         float(q_out.get("scale", 0.0)), float(q_out.get("zero_point", 0))],
    }
    if meta.get("threshold") is not None:
        methods["threshold"] = float(meta["threshold"])
    return methods


def embed_tflite_metadata(buf: bytes, meta: dict) -> bytes:
    """Return the flatbuffer with a `toolchain_metadata` Model.metadata entry (JSON bytes)."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    payload = serialized_metadata(meta).encode("utf-8")
    model.metadata = [m for m in (model.metadata or []) if m.name not in (TFLITE_METADATA_NAME.encode(),
                                                                          TFLITE_METADATA_NAME)]
    entry_buf = schema.BufferT()
    entry_buf.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(entry_buf)
    md = schema.MetadataT()
    md.name = TFLITE_METADATA_NAME
    md.buffer = len(model.buffers) - 1
    model.metadata.append(md)
    builder = flatbuffers.Builder(len(buf) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
