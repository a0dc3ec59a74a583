"""The int8 choices a recipe makes under `export.int8`, and how they reach the PT2E quantizers.

- `calibration`: how an activation's int8 range is chosen from the calibration images.
  - `mse` (default): the histogram search that minimises the L2 quantisation error
    (torchao's HistogramObserver; what ExecuTorch's XNNPACK quantizer uses out of the box).
  - `minmax`: the observed minimum and maximum (MinMaxObserver); nothing is clipped.
  - `percentile`: the `percentile`-th and (100 - `percentile`)-th percentiles of the histogram;
    the tails beyond them are clipped.
- `outlier_factor` (None: off): calibration images on which the float model's activations, at
  some layer, exceed this many times the median over the images are left out of calibration
  (toolchain.quantize.outliers).
- `bias_correction`: after conversion, each convolution's and linear layer's bias absorbs the
  mean error its int8 output shows against the float model on the calibration images, measured
  on each runtime's own int8 graph (toolchain.quantize.bias_correction for PT2E,
  toolchain.export.tflite_bias_correction for the TFLite converter's file).
- `equalize`: cross-layer range equalization before either runtime quantises: every channel of
  an activation between a convolution and the next gets the tensor's full int8 range, exact in
  float (toolchain.quantize.equalize).
- `qat_steps` (0: off), `qat_lr`, `qat_batch`: quantization-aware fine-tuning under PT2E fake
  quantisation before either runtime quantises (toolchain.quantize.qat); embedding models only.
- `float_layers`: modules kept in float inside the int8 file (the accuracy-aware fallback of
  toolchain.quantize.sensitivity chooses them for the `.pte`, and that of
  toolchain.export.tflite_fallback its own for onnx2tf's `.tflite`; `fallback: true` in a
  recipe). Given with the fallback off, they stay float in both files. `fallback_unit`:
  what the fallback ranks and keeps, one conv or linear `layer` at a time (default) or one
  `block` (a child of the model's top-level containers: `features.3`, with every op inside).
- `agreement_risk` (default 0.05): how often a file the fallback passes may still flip more
  decisions than the agreement bound allows; the fallback's score-noise target is set so that
  the expected flips stay within the allowance all but this share of the time
  (toolchain.evaluate.flips.agreement_target). Lower asks for a quieter file, which may keep
  more in float.
- `full_range_layers`: modules (blocks or layers) whose activations take the calibration
  images' full range, their minimum and maximum, whatever `calibration` says: nothing they write
  is clipped, for a coarser step. Costs no bytes and no latency. For a block where rare images
  run past the clipped range (SeesawFaceNet's `features.14`, docs/int8-backbones.md). Both
  int8 files (toolchain.quantize.pt2e, toolchain.export.tflite_calibration).

`from_any(value, fmt)` reads a recipe's section for one format: its `executorch` / `tflite`
sub-mapping replaces the keys it sets (None inherits), for that format's int8 file alone.

The calibration method applies to every int8 file: PT2E's observers make the ExecuTorch `.pte`
and the litert-torch `.tflite`, and the same observers set the ranges of onnx2tf's `.tflite`
before the TFLite converter quantises it (toolchain.export.tflite_calibration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from toolchain.evaluate.flips import AGREEMENT_RISK

CALIBRATION_METHODS = ("mse", "minmax", "percentile")
FALLBACK_UNITS = ("layer", "block")
FORMATS = ("executorch", "tflite")  # the keys of a section's per-format overrides
# onnx2tf's .tflite: the converter quantises, with ranges from the same observers.
TFLITE_CONVERTER_METHOD = {"by": "TFLite converter (ranges: torchao observers)"}


@dataclass(frozen=True)
class Int8Options:
    calibration: str = "mse"
    percentile: float = 99.99
    outlier_factor: float | None = None
    bias_correction: bool = False
    equalize: bool = False
    qat_steps: int = 0
    qat_lr: float = 1e-5
    qat_batch: int = 16
    float_layers: tuple[str, ...] = ()
    fallback: bool = False
    max_float_layers: int = 8
    fallback_unit: str = "layer"
    full_range_layers: tuple[str, ...] = ()
    agreement_risk: float = AGREEMENT_RISK

    def __post_init__(self):
        from toolchain.errors import ToolchainError

        if self.calibration not in CALIBRATION_METHODS:
            raise ToolchainError(f"unknown int8 calibration method {self.calibration!r} "
                                 f"({', '.join(CALIBRATION_METHODS)})")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ToolchainError(f"int8 calibration percentile {self.percentile} is not in (50, 100]")
        if self.outlier_factor is not None and not float(self.outlier_factor) > 1.0:
            raise ToolchainError(f"int8 calibration: outlier_factor {self.outlier_factor} must be > 1 (or null: off)")
        if int(self.max_float_layers) < 1:
            raise ToolchainError(f"int8 fallback: max_float_layers {self.max_float_layers} must be >= 1")
        if self.fallback_unit not in FALLBACK_UNITS:
            raise ToolchainError(f"unknown int8 fallback_unit {self.fallback_unit!r} ({', '.join(FALLBACK_UNITS)})")
        if not 0.0 < float(self.agreement_risk) < 1.0:
            raise ToolchainError(f"int8 fallback: agreement_risk {self.agreement_risk} must be in (0, 1)")
        if int(self.qat_steps) < 0 or not float(self.qat_lr) > 0 or int(self.qat_batch) < 2:
            raise ToolchainError(f"int8 QAT: steps {self.qat_steps} (>= 0), lr {self.qat_lr} (> 0) and batch "
                                 f"{self.qat_batch} (>= 2) are out of range")
        object.__setattr__(self, "float_layers", tuple(str(x) for x in self.float_layers))
        object.__setattr__(self, "full_range_layers", tuple(str(x) for x in self.full_range_layers))

    @classmethod
    def from_any(cls, value, fmt: str | None = None) -> "Int8Options":
        """Options from None, an Int8Options, a recipe section or a dict. With `fmt`, that
        format's overrides (`value[fmt]`) apply; without it, the section's own values."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        data = dict(value)
        overrides = {f: data.pop(f, None) or {} for f in FORMATS}
        if fmt is not None:
            data |= {k: v for k, v in dict(overrides[fmt]).items() if v is not None}
        return cls(**data)

    def to_dict(self) -> dict:
        out = {"calibration": self.calibration, "bias_correction": self.bias_correction}
        if self.calibration == "percentile":
            out["percentile"] = float(self.percentile)
        if self.outlier_factor is not None:
            out["outlier_factor"] = float(self.outlier_factor)
        if self.equalize:
            out["equalize"] = True
        if self.qat_steps:
            out |= {"qat_steps": int(self.qat_steps), "qat_lr": float(self.qat_lr), "qat_batch": int(self.qat_batch)}
        if self.fallback:
            out |= {"fallback": True, "max_float_layers": int(self.max_float_layers)}
            if self.fallback_unit != "layer":
                out["fallback_unit"] = self.fallback_unit
            if self.agreement_risk != AGREEMENT_RISK:
                out["agreement_risk"] = float(self.agreement_risk)
        if self.float_layers:
            out["float_layers"] = list(self.float_layers)
        if self.full_range_layers:
            out["full_range_layers"] = list(self.full_range_layers)
        return out

    def applied(self, pt2e: bool, float_layers: bool | None = None) -> dict:
        """What an int8 artifact records as its method (`checks.int8_method`): PT2E and the
        TFLite converter path both apply every option. `float_layers` (default: `pt2e`) says whether the file keeps the fallback's layers in float: only the
        ExecuTorch `.pte` does, so a `.tflite` never records them."""
        keep_float = pt2e if float_layers is None else float_layers
        done = {k: v for k, v in self.to_dict().items() if keep_float or k != "float_layers"}
        if pt2e:
            return {**done, "by": "PT2E (torchao)"}
        return {**done, **TFLITE_CONVERTER_METHOD}

    @property
    def is_default(self) -> bool:
        return self == Int8Options()


def percentile_observer():
    """HistogramObserver whose range is two percentiles of its histogram (built lazily: torchao
    is imported only where an int8 export runs)."""
    import torch
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        def __init__(self, *args, percentile: float = 99.99, **kwargs):
            super().__init__(*args, **kwargs)
            self.percentile = float(percentile)

        def _non_linear_param_search(self):
            hist = self.histogram.to(torch.float64)
            total = hist.sum()
            if total <= 0:
                return self.min_val, self.max_val
            edges = torch.linspace(float(self.min_val), float(self.max_val), self.bins + 1, dtype=torch.float64)
            cdf = torch.cumsum(hist, 0) / total
            tail = (100.0 - self.percentile) / 100.0
            lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
            hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
            lo = edges[min(lo_bin, self.bins)] if tail > 0 else edges[0]
            hi = edges[min(hi_bin + 1, self.bins)] if tail > 0 else edges[-1]
            return lo.to(self.min_val.dtype), hi.to(self.max_val.dtype)

    return PercentileObserver


def with_calibration(config, options: Int8Options):
    """`config` (a PT2E QuantizationConfig) with its activation observers set by `options`."""
    if options.calibration == "mse":
        return config  # the quantizers' own HistogramObserver
    from torchao.quantization.pt2e.observer import MinMaxObserver

    def swap(spec):
        if spec is None or getattr(spec, "is_dynamic", False):
            return spec
        ctor = spec.observer_or_fake_quant_ctr
        kwargs = dict(getattr(ctor, "keywords", {}) or {})  # keeps the quantizer's eps
        if options.calibration == "minmax":
            new = MinMaxObserver.with_args(**kwargs)
        else:
            new = percentile_observer().with_args(percentile=float(options.percentile), **kwargs)
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=new)

    return dataclasses.replace(config, input_activation=swap(config.input_activation),
                               output_activation=swap(config.output_activation))
