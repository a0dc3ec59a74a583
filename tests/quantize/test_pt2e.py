"""PT2E int8 for XNNPACK: the pooled features get their own int8 range."""

import numpy as np
import torch

from toolchain.models import build_model
from toolchain.quantize.pt2e import quantize_xnnpack_int8


def _scales(converted) -> dict[str, float]:
    return {n.args[0].name: float(n.args[1]) for n in converted.graph.nodes
            if n.op == "call_function" and str(n.target).endswith("quantize_per_tensor.default")
            and "dequantize" not in str(n.target)}


def test_global_pool_output_has_its_own_finer_range():
    torch.manual_seed(0)
    model = build_model("verifier").eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    converted = quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), images, model.spec.mean, model.spec.std)
    scales = _scales(converted)
    # relu_6 is the trunk's last activation, the map the pool averages (relu_7 is the head's)
    # (the stock annotation would make them equal: a shared range)
    assert scales["adaptive_avg_pool2d"] < scales["relu_6"], scales


def test_float_layer_before_a_view_leaves_the_view_float_instead_of_failing():
    """A flatten shares its input's quantisation; with that input's layer kept in float there is
    nothing to share, and PT2E's prepare used to fail with a KeyError."""
    from torch import nn

    from toolchain.export.int8_prelu import with_int8_prelu
    from toolchain.quantize.int8_options import Int8Options

    torch.manual_seed(0)
    model = with_int8_prelu(nn.Sequential(nn.Conv2d(3, 8, 3, stride=8), nn.PReLU(8), nn.Flatten(1),
                                          nn.Linear(8 * 14 * 14, 4)).eval())
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    x = torch.randn(1, 3, 112, 112)
    report = {}
    converted = quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), images, (0.5,) * 3, (0.5,) * 3,
                                      report=report, int8=Int8Options(float_layers=("1",)))
    assert report["float_layers"] == ["1"]
    assert "add" in report["float_ops"], report  # the PReLU's add stayed float, as asked
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert torch.nn.functional.cosine_similarity(out, ref).item() > 0.99


def test_full_range_layers_take_the_observed_min_max_and_add_no_requantise():
    """The tensors a named module writes get MinMax ranges; every other keeps the recipe's
    method, and the graph gets no extra quantise at the module's edge."""
    import pytest
    from torch import nn

    from toolchain.errors import ToolchainError
    from toolchain.quantize.int8_options import Int8Options

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.Conv2d(8, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(1), nn.Linear(8, 4)).eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)

    def converted(**kw):
        return quantize_xnnpack_int8(model, torch.zeros(1, 3, 64, 64), images, (0.5,) * 3, (0.5,) * 3,
                                     int8=Int8Options(**kw))

    clipped = converted(calibration="percentile", percentile=90.0)
    full = converted(calibration="percentile", percentile=90.0, full_range_layers=("0",))
    minmax = converted(calibration="minmax")
    c, f, m = _scales(clipped), _scales(full), _scales(minmax)
    assert f.keys() == c.keys()  # no quantise added
    assert f["conv2d"] == pytest.approx(m["conv2d"], rel=1e-6) and f["conv2d"] > 1.2 * c["conv2d"]
    assert f["conv2d_1"] == pytest.approx(c["conv2d_1"], rel=1e-6)  # the next layer keeps its percentile
    with pytest.raises(ToolchainError, match="full_range_layers: nope is not a module"):
        converted(calibration="percentile", full_range_layers=("nope",))
