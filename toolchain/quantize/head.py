"""A verifier's per-user int8 values, computed by one function for every path that writes them.

Two users' verifiers differ only in the tensors the model declares per-user (the head) and in the
quantisation that follows from them. A full export (`toolchain export`) and the fleet path
(`toolchain fleet`) both call `quantize_head`, and write its result into the converter's output;
so a fleet file patched from a template is byte-identical to that user's full export by
construction.

Scheme (what XNNPACK and LiteRT run in int8):
- weights: symmetric per output channel, scale = max|w| / 127, values in [-127, 127], rounded half
  to even (numpy);
- bias: int32 at scale input_scale x weight_scale (LiteRT stores it so; ExecuTorch keeps the float
  bias and XNNPACK quantises it the same way at load);
- the hidden activation (after ReLU): min-max over the calibration images' features, zero-point
  -128;
- the logit: min-max, widened to hold the decision threshold with a margin, then moved so the
  threshold sits on a bin edge (toolchain.quantize.decision).
The calibration features are the shared trunk's pooled features of the calibration images: the
same for every user, computed once per fleet.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.quantize.decision import QMAX, QMIN, threshold_aligned_qparams

_TINY = 1e-8


@dataclass
class LayerQuant:
    """One per-user linear layer in int8."""

    name: str  # state-dict prefix, e.g. "head.0"
    weight: np.ndarray  # float32 (out, in), as in the float model
    bias: np.ndarray  # float32 (out,)
    weight_q: np.ndarray  # int8 (out, in)
    weight_scale: np.ndarray  # float32 (out,)
    input_scale: float  # of the activation this layer reads
    bias_q: np.ndarray  # int32 (out,) at input_scale * weight_scale
    output_scale: float  # of the activation this layer writes (after its ReLU, if any)
    output_zero_point: int

    @property
    def bias_scale(self) -> np.ndarray:
        return _bias_scale(self.input_scale, self.weight_scale)


@dataclass
class HeadQuant:
    layers: list[LayerQuant]

    @property
    def output(self) -> tuple[float, int]:
        return self.layers[-1].output_scale, self.layers[-1].output_zero_point


def _bias_scale(input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    return (np.float32(input_scale) * weight_scale).astype(np.float32)


def bias_int32(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int32 bias at `scale` (float32, per channel), in XNNPACK's arithmetic: its serializer
    quantises the .pte's float bias as round(b * (1 / scale)) in float32 (quantize_per_channel).
    Dividing instead differs by one step where the quotient sits near a half, and the fleet's
    bytes must equal the full export's."""
    b = np.asarray(bias, np.float32)
    q = np.rint(b * (np.float32(1.0) / np.asarray(scale, np.float32)))
    return np.clip(q, -(2 ** 31) + 1, 2 ** 31 - 1).astype(np.int32)


def _per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(_TINY)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _asymmetric(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(np.float32(max((hi - lo) / (QMAX - QMIN), _TINY)))
    zero_point = int(np.clip(QMIN - np.rint(lo / scale), QMIN, QMAX))
    return scale, zero_point


def head_layers(state: dict) -> list[str]:
    """The per-user linear layers of a verifier state dict, in order ("head.0", "head.2")."""
    names = sorted({k.rsplit(".", 1)[0] for k in state if k.startswith("head.") and k.endswith(".weight")},
                   key=lambda n: int(n.split(".")[1]))
    if len(names) != 2:
        raise ToolchainError(f"verifier head: expected two linear layers, found {names}")
    return names


def quantize_head(state: dict, per_user: list[str], features: np.ndarray, feature_scale: float,
                  threshold: float) -> HeadQuant:
    """int8 values of a verifier's per-user head.

    state: the verifier's float state dict (tensors or arrays); per_user: the names the model
    declares per-user (`Verifier.per_user_tensors()`), which must be the head's; features: (N, F)
    float pooled trunk features of the calibration images; feature_scale: the int8 scale of those
    features in the converted graph (the head's input); threshold: the decision threshold (logit).
    """
    layers = head_layers(state)
    expected = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    if set(per_user) != expected:
        extra = sorted(set(per_user) - expected)
        raise ToolchainError(f"the fleet path writes per-user head tensors only; this verifier also declares "
                             f"{', '.join(extra) or 'other tensors'} per-user (export it with `toolchain export`)")

    def arr(name):
        v = state[name]
        return np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float32)

    # One BLAS thread: the same arithmetic in every caller, and no idle BLAS threads spinning
    # against torch's between users (measured: a fleet's per-user embedding 4x slower without).
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _quantize_layers(arr, layers, np.asarray(features, np.float32), float(np.float32(feature_scale)),
                                threshold)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """Scanning the loaded libraries costs ~2 ms with torch and TensorFlow loaded: done once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _quantize_layers(arr, layers, x, in_scale, threshold) -> HeadQuant:
    out: list[LayerQuant] = []
    for i, name in enumerate(layers):
        w, b = arr(f"{name}.weight"), arr(f"{name}.bias")
        wq, ws = _per_channel(w)
        bq = bias_int32(b, _bias_scale(in_scale, ws))
        y = x @ w.T + b
        last = i == len(layers) - 1
        if last:
            # The threshold must be inside the range, with room on both sides: shared calibration
            # images are mostly impostors, whose logits may all fall below it.
            lo, hi = float(y.min()), float(y.max())
            margin = 0.1 * max(hi - lo, abs(float(threshold)), 1e-3)
            scale, zp = _asymmetric(min(lo, threshold - margin), max(hi, threshold + margin))
            scale, zp = threshold_aligned_qparams(scale, zp, float(threshold))
            scale = float(np.float32(scale))
        else:
            y = np.maximum(y, 0.0)  # the hidden layer's ReLU
            scale, zp = _asymmetric(0.0, y.max())
        out.append(LayerQuant(name=name, weight=w, bias=b, weight_q=wq, weight_scale=ws, input_scale=in_scale,
                              bias_q=bq, output_scale=scale, output_zero_point=zp))
        x, in_scale = y, scale
    return HeadQuant(out)
