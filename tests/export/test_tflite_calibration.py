"""onnx2tf's int8 .tflite takes its activation ranges from the recipe's calibration method."""

import numpy as np
import pytest

from toolchain.quantize.int8_options import Int8Options

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """conv -> relu -> reshape -> dense: a computed range, a copied one, and the output."""
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 8)).astype(np.float32))
    dense = tf.constant(rng.normal(size=(8 * 8 * 8, 4)).astype(np.float32) / 20)

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            y = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
            return tf.matmul(tf.reshape(y, [1, -1]), dense)

    path = tmp_path_factory.mktemp("net") / "saved_model"
    tf.saved_model.save(Net(), str(path))
    return str(path)


def _inputs(n=32):
    x = np.random.default_rng(1).normal(size=(n, 8, 8, 3)).astype(np.float32)
    x[0, 0, 0, :] = 60.0  # one outlier pixel: min-max widens every range downstream for it
    return x


def _activation_scales(buf: bytes) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=buf)
    return {d["name"]: float(d["quantization"][0]) for d in interpreter.get_tensor_details()
            if d["dtype"] == np.int8 and len(d["shape"]) in (2, 4) and d["quantization"][0] > 0
            and "Const" not in d["name"] and d["shape"][-1] in (4, 8, 512)}


def test_ranges_follow_the_method_and_copies_follow_their_source(saved_model):
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.tflite_calibration import quantize_saved_model

    minmax = quantize_saved_model(saved_model, _inputs(), Int8Options(calibration="minmax"))
    mse = quantize_saved_model(saved_model, _inputs(), Int8Options(calibration="mse"))
    clipped = quantize_saved_model(saved_model, _inputs(), Int8Options(calibration="percentile", percentile=99.0))
    a, b, c = _activation_scales(minmax), _activation_scales(mse), _activation_scales(clipped)
    assert a.keys() == b.keys() == c.keys() and len(a) >= 3
    assert all(b[k] <= a[k] * (1 + 1e-6) and c[k] <= a[k] * (1 + 1e-6) for k in a)
    assert any(c[k] < 0.5 * a[k] for k in a)  # the outlier is outside the 99th percentile
    # The reshape's output keeps the relu's range (LiteRT copies the int8 values unchanged).
    details = {d["name"]: d for d in Interpreter(model_content=clipped).get_tensor_details()}
    relu = next(d for n, d in details.items() if "Relu" in n and len(d["shape"]) == 4)
    reshaped = next(d for n, d in details.items() if "Reshape" in n and d["dtype"] == np.int8
                    and list(d["shape"]) == [1, 512])
    assert relu["quantization"] == reshaped["quantization"]


def test_minmax_equals_the_converters_one_step_conversion(saved_model):
    from toolchain.export.tflite_calibration import quantize_saved_model

    inputs = _inputs()

    def representative():
        for i in range(len(inputs)):
            yield [tf.constant(inputs[i:i + 1])]

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.representative_dataset = representative
    converter.inference_input_type = converter.inference_output_type = tf.int8
    direct = converter.convert()
    ours = quantize_saved_model(saved_model, inputs, Int8Options(calibration="minmax"))
    assert _activation_scales(ours) == _activation_scales(direct)


def test_full_range_tensors_take_their_min_max_and_the_rest_their_method(saved_model):
    from toolchain.errors import ToolchainError
    from toolchain.export.tflite_calibration import quantize_saved_model

    minmax = _activation_scales(quantize_saved_model(saved_model, _inputs(), Int8Options(calibration="minmax")))
    options = Int8Options(calibration="percentile", percentile=99.0, full_range_layers=("conv",))
    clipped = _activation_scales(quantize_saved_model(saved_model, _inputs(), Int8Options(calibration="percentile",
                                                                                          percentile=99.0)))
    relu = [k for k in clipped if "Relu" in k]
    assert relu and all(clipped[k] < 0.5 * minmax[k] for k in relu)
    full = _activation_scales(quantize_saved_model(saved_model, _inputs(), options, full_range_ops=lambda _: relu))
    assert all(abs(full[k] / minmax[k] - 1) < 1e-6 for k in relu)
    assert all(full[k] == clipped[k] for k in clipped if k not in relu and "Reshape" not in k)
    # The reshape copies its source's range, full range included.
    assert all(abs(full[k] / minmax[k] - 1) < 1e-6 for k in full if "Reshape" in k)
    with pytest.raises(ToolchainError, match="full_range_layers"):
        quantize_saved_model(saved_model, _inputs(), options)
