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
