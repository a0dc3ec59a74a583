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
