"""A user's per-user values, encoded every way a converted file may store them.

The patch plan (toolchain.fleet.patch) searches the probe files for these encodings; encodings a
format does not use are simply not found. Names are `<layer>.<what>.<encoding>`, plus
`.sha256` for the hex key ExecuTorch names a data blob by, and `metadata` for the embedded JSON
(padded to a fixed size, so its length never depends on the user).
"""

from __future__ import annotations

import hashlib

import numpy as np

from toolchain.quantize.head import HeadQuant, head_layers


def _with_key(out: dict[str, bytes], name: str, raw: bytes) -> None:
    out[name] = raw
    out[name + ".sha256"] = hashlib.sha256(raw).hexdigest().encode()


def _scalar(out: dict[str, bytes], name: str, value: float, integer: bool) -> None:
    out[name + ".f32"] = np.float32(value).tobytes()
    out[name + ".f64"] = np.float64(np.float32(value) if not integer else value).tobytes()
    if integer:
        out[name + ".i32"] = np.int32(value).tobytes()
        out[name + ".i64"] = np.int64(value).tobytes()


def encoded_values(precision: str, state: dict, head: HeadQuant | None, metadata: bytes) -> dict[str, bytes]:
    """{name: bytes} of one user's file of `precision` ("int8" needs `head`)."""
    out: dict[str, bytes] = {"metadata": metadata}
    if precision == "fp32":
        for layer in head_layers(state):
            for part in ("weight", "bias"):
                v = state[f"{layer}.{part}"]
                v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                _with_key(out, f"{layer}.{part}.f32", np.ascontiguousarray(v, dtype="<f4").tobytes())
        return out
    for q in head.layers:
        _with_key(out, f"{q.name}.weight.i8", np.ascontiguousarray(q.weight_q).tobytes())
        _with_key(out, f"{q.name}.weight_scale.f32", q.weight_scale.astype("<f4").tobytes())
        _with_key(out, f"{q.name}.bias.f32", q.bias.astype("<f4").tobytes())
        _with_key(out, f"{q.name}.bias.i32", q.bias_q.astype("<i4").tobytes())
        _with_key(out, f"{q.name}.bias_scale.f32", q.bias_scale.astype("<f4").tobytes())
        _scalar(out, f"{q.name}.out_scale", q.output_scale, integer=False)
        _scalar(out, f"{q.name}.out_zero_point", q.output_zero_point, integer=True)
    return out
