"""The int8 .tflite's two-op PReLUs add exactly where that errs less
(toolchain.export.tflite_calibration.exact_prelu_adds): the add's output and its ReLU branch take
the PReLU input's grid step, so the add sums integers without rounding."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.export.int8_prelu import with_int8_prelu

pytest.importorskip("tensorflow")
pytest.importorskip("onnx2tf")

MEAN = STD = (0.5, 0.5, 0.5)


class TwoPReLUs(nn.Module):
    """conv -> PReLU -> 1x1 conv -> PReLU -> 1x1 conv -> pool: both PReLUs feed a convolution.
    `shift` moves the PReLU inputs off zero, as trained BatchNorms do: the exact add then errs
    less; on zero-centred inputs the calibrated grids can."""

    def __init__(self, shift: float, slopes=(0.05, 0.4)) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16)
        self.conv2, self.act2 = nn.Conv2d(16, 16, 1), nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            for act in (self.act1, self.act2):
                act.weight.uniform_(*slopes)  # trained backbones' slopes are mostly in 0.05-0.4
            for conv in (self.conv1, self.conv2):
                conv.bias.add_(shift)

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.conv3(y).mean((2, 3))


def _export(shift: float, slopes=(0.05, 0.4)):
    """{"tied": int8 bytes, "calibrated": int8 bytes without the tie, "rows": what it changed,
    "model", "images"}."""
    from unittest.mock import patch

    import toolchain.export.tflite_calibration as calibration
    from toolchain.export.tflite import export_tflite_onnx2tf

    torch.manual_seed(0)
    model = TwoPReLUs(shift, slopes).eval()
    rewritten = with_int8_prelu(model)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    example = torch.zeros(1, 3, 16, 16)

    def export():
        return export_tflite_onnx2tf(rewritten, example, ["int8"], calib, MEAN, STD)["int8"]

    rows, choose = [], calibration.exact_prelu_adds

    def recorded(buf, inputs):
        out, changed = choose(buf, inputs)
        rows.extend(changed)
        return out, changed

    with patch.object(calibration, "exact_prelu_adds", recorded):
        tied = export()
    with patch.object(calibration, "exact_prelu_adds", lambda buf, inputs: (buf, [])):
        untied = export()
    return {"tied": tied, "calibrated": untied, "rows": rows, "model": model,
            "images": rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def files():
    return _export(shift=1.0)


def _prelu_adds(buf: bytes, images=None):
    """[(x, t, out)] tensor details of each PReLU add, with their int8 values on `images[0]` when
    given (LiteRT's reference kernels, which keep every intermediate tensor)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=buf, experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    if images is not None:
        feed = interpreter.get_input_details()[0]
        scale, zero = feed["quantization"]
        x = (images[:1].astype(np.float32) / 255 - 0.5) / 0.5
        interpreter.set_tensor(feed["index"], np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8))
        interpreter.invoke()
    ops = interpreter._get_ops_details()
    producer = {o: op for op in ops for o in op["outputs"]}
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    found = []
    for op in ops:
        if op["op_name"] != "ADD":
            continue
        for x, t in (tuple(op["inputs"]), tuple(op["inputs"])[::-1]):
            branch = producer.get(t)
            if branch is not None and branch["op_name"] == "DEPTHWISE_CONV_2D" and branch["inputs"][0] != x:
                branch = producer.get(branch["inputs"][0])  # slopes above 1: the sign convolution
            if branch is not None and branch["op_name"] == "DEPTHWISE_CONV_2D" and branch["inputs"][0] == x:
                trio = [dict(details[i]) for i in (x, t, op["outputs"][0])]
                if images is not None:
                    for d in trio:
                        d["value"] = interpreter.get_tensor(d["index"]).astype(np.int64)
                found.append(trio)
                break
    return found


def test_each_prelu_add_shares_its_input_scale(files):
    adds = _prelu_adds(files["tied"])
    assert len(adds) == 2 and len(files["rows"]) == 2
    assert all(r["mse"][1] < r["mse"][0] for r in files["rows"])
    for x, t, out in adds:
        s = x["quantization"][0]
        assert t["quantization"][0] == pytest.approx(s, rel=1e-6)
        assert out["quantization"][0] == pytest.approx(s, rel=1e-6)
    # Calibrated tensor by tensor, the branch's and the output's steps are their own.
    untied = _prelu_adds(files["calibrated"])
    assert all(abs(t["quantization"][0] / x["quantization"][0] - 1) > 0.01 for x, t, _ in untied)


def test_slopes_above_one_add_exactly_too():
    # Their branch has a second depthwise 1x1 (the sign) and takes negative values too.
    files = _export(shift=1.0, slopes=(0.5, 1.6))
    assert len(files["rows"]) >= 1 and all(r["sign"] for r in files["rows"])
    test_the_add_sums_integers_exactly(files)


def test_the_add_sums_integers_exactly(files):
    adds = _prelu_adds(files["tied"], files["images"])
    tied = [(x, t, out) for x, t, out in adds if out["quantization"][0] == pytest.approx(x["quantization"][0], rel=1e-6)]
    assert len(adds) == 2 and len(tied) == len(files["rows"])
    for x, t, out in tied:
        zx, zt, zo = (d["quantization"][1] for d in (x, t, out))
        expected = (x["value"] - zx) + (t["value"] - zt) + zo
        assert np.array_equal(out["value"], np.clip(expected, -128, 127))
        assert (out["value"] != x["value"] - zx + zo).any()  # the branch did add something


@pytest.mark.parametrize("centre,exact_wins", [(1.0, True), (0.0, False)])
def test_the_exact_add_is_taken_where_it_errs_less(centre, exact_wins):
    from toolchain.export.tflite_calibration import prelu_add_errors

    # Off zero (as after a trained BatchNorm) few values take the branch, and sparing every
    # positive one its second rounding wins; zero-centred, the branch's coarser step costs more.
    x = np.random.default_rng(0).normal(centre, 1.0 if centre == 0 else 0.5, 200_000)
    t = 0.8 * np.maximum(-x, 0)  # slope 0.2
    x_span, t_span, out_span = (x.min(), x.max()), (0.0, t.max()), ((x + t).min(), (x + t).max())
    calibrated, exact = prelu_add_errors(x, t, x_span, t_span, out_span, (0.0, x_span[1] - x_span[0]))
    assert (exact < calibrated) == exact_wins, (calibrated, exact)
