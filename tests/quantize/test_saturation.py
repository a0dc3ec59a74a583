"""int8 ranges narrowed where an int8 sigmoid cannot tell values apart (toolchain.quantize.saturation)."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.quantize.saturation import SIGMOID_ONE, SIGMOID_ZERO, affine_qparams, narrowed_range


def _int8_sigmoid_level(x: np.ndarray) -> np.ndarray:
    """XNNPACK's and LiteRT's int8 sigmoid: the output level on the fixed grid (1/256, -128)."""
    return np.clip(np.round(256.0 / (1.0 + np.exp(-x))) - 128, -128, 127)


def _on_grid(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale, zp = affine_qparams(lo, hi)
    return (np.clip(np.round(x / scale) + zp, -128, 127) - zp) * scale


def test_clipped_values_give_the_sigmoid_level_they_gave_before():
    x = np.linspace(-30.0, 30.0, 20001)
    lo, hi = -25.0, 25.0
    for readers in ("silu", "sigmoid"):
        new_lo, new_hi = narrowed_range(lo, hi, readers)
        assert new_lo == SIGMOID_ZERO and new_hi == (SIGMOID_ONE if readers == "sigmoid" else hi)
        wide, narrow = _on_grid(x, lo, hi), _on_grid(x, new_lo, new_hi)
        clipped = (x <= new_lo) | (x >= new_hi)
        assert clipped.any()
        # Where the narrow grid clips, the int8 sigmoid writes the level of the exact value ...
        assert np.array_equal(_int8_sigmoid_level(narrow[clipped]), _int8_sigmoid_level(x[clipped]))
        # ... and elsewhere the step is finer, so values land closer to where they are.
        kept = ~clipped
        assert np.abs(narrow[kept] - x[kept]).max() < np.abs(wide[kept] - x[kept]).max()
    # An int8 SiLU, x * sigmoid(x): below the clip the product is an exact 0 either way.
    below = x < SIGMOID_ZERO
    assert np.all(_int8_sigmoid_level(_on_grid(x[below], SIGMOID_ZERO, hi)) == -128)


class _SiLUAndGate(nn.Module):
    """conv -> x * sigmoid(x) -> SE gate (linear -> sigmoid) -> conv, with pre-activations that
    reach far below zero (the biases), as SeesawFaceNet's do."""

    def __init__(self, read_twice: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 4, 1)
        self.read_twice = read_twice
        with torch.no_grad():
            self.conv.weight.mul_(4.0)
            self.conv.bias.copy_(torch.linspace(-12.0, 2.0, 8))
            self.fc.weight.mul_(8.0)
            self.fc.bias.copy_(torch.linspace(-9.0, 9.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.conv(x)
        y = pre * torch.sigmoid(pre)
        if self.read_twice:  # the pre-activation read by something else too: its range must stay
            y = y + pre
        gate = torch.sigmoid(self.fc(y.mean((2, 3))))
        y = y * gate[:, :, None, None]
        return self.out(y).mean((2, 3))


def _int8(model, monkeypatch=None):
    from toolchain.quantize.pt2e import quantize_xnnpack_int8

    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(rng.normal(size=(32, 3, 16, 16)).astype(np.float32))
    report = {}
    q = quantize_xnnpack_int8(model.eval(), x[:1], calib, [0.5] * 3, [0.5] * 3, report=report)
    with torch.no_grad():
        err = float(torch.cat([q(x[i:i + 1]) for i in range(len(x))]).sub(model(x)).pow(2).mean())
    return report, err


def test_pt2e_narrows_silu_and_gate_inputs_and_the_int8_error_falls(monkeypatch):
    import toolchain.quantize.pt2e as pt2e

    report, err = _int8(_SiLUAndGate())
    narrowed = report["sigmoid_ranges"]
    assert narrowed["by_readers"] == {"sigmoid": 1, "silu": 1}
    assert narrowed["step_ratio_mean"] < 0.9
    monkeypatch.setattr(pt2e, "narrow_sigmoid_ranges", lambda graph: [])
    plain_report, plain_err = _int8(_SiLUAndGate())
    assert "sigmoid_ranges" not in plain_report
    assert err < plain_err


def test_a_range_read_by_other_ops_is_kept():
    report, _ = _int8(_SiLUAndGate(read_twice=True))
    assert report["sigmoid_ranges"]["by_readers"] == {"sigmoid": 1}  # the gate only


def test_tflite_narrows_the_silu_input(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.tflite_calibration import quantize_saved_model
    from toolchain.quantize.int8_options import Int8Options

    rng = np.random.default_rng(0)
    kernel = tf.constant(4 * rng.normal(size=(3, 3, 3, 8)).astype(np.float32))
    bias = tf.constant(np.linspace(-12, 2, 8).astype(np.float32))

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            pre = tf.nn.conv2d(x, kernel, 1, "SAME") + bias
            return tf.reduce_mean(pre * tf.sigmoid(pre), axis=[1, 2])

    path = str(tmp_path / "saved_model")
    tf.saved_model.save(Net(), path)
    inputs = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    interpreter = Interpreter(model_content=quantize_saved_model(path, inputs, Int8Options(calibration="minmax")))
    logistic = next(op for op in interpreter._get_ops_details() if op["op_name"] == "LOGISTIC")
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    scale, zp = details[logistic["inputs"][0]]["quantization"]
    assert scale > 0
    assert scale * (-128 - zp) >= SIGMOID_ZERO - scale  # the bottom of the range sits at the clip


def test_qat_trains_on_the_narrowed_grid_and_the_sigmoids_fixed_one(monkeypatch):
    from torchao.quantization.pt2e.fake_quantize import FixedQParamsFakeQuantize

    import toolchain.quantize.qat as qat

    seen = {}
    narrow = qat.narrow_fake_quant_ranges

    def spy(prepared):
        rows = narrow(prepared)
        seen["rows"] = rows
        seen["fixed"] = [m for m in prepared.modules() if isinstance(m, FixedQParamsFakeQuantize)]
        return rows

    monkeypatch.setattr(qat, "narrow_fake_quant_ranges", spy)
    images = np.random.default_rng(0).integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    _, report = qat.qat_finetune(_SiLUAndGate().eval(), images, [0.5] * 3, [0.5] * 3, steps=2, batch=8,
                                 progress=False)
    assert report["sigmoid_ranges_narrowed"] == 2
    assert sorted(r["readers"] for r in seen["rows"]) == ["sigmoid", "silu"]
    assert all(r["narrowed"][0] >= SIGMOID_ZERO - 0.1 for r in seen["rows"])
    assert len(seen["fixed"]) == 2 and all(float(m.scale) == 1 / 256 for m in seen["fixed"])
