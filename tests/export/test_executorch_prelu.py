"""PReLU in int8 inside ExecuTorch's XNNPACK partition: annotated by toolchain.quantize.pt2e
(per-tensor int8 slopes, its own output range) and handed over by the partitioner
(toolchain.export.executorch); the .pte runs XNNPACK's int8 PReLU instead of the two-op form."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.models import build_model
from toolchain.quantize.int8_options import Int8Options


class _Prelus(nn.Module):
    """PReLU on a feature map (slopes below 0, between 0 and 1, and above 1) and on a pooled
    1x1 map, as in the backbones' bodies and embedding heads. (ExecuTorch's XNNPACK lowering
    takes PReLU on 4-D tensors only, fp32 too: the models keep theirs 4-D.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.PReLU(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head, self.act2 = nn.Conv2d(16, 8, 1), nn.PReLU(8)
        with torch.no_grad():
            self.act.weight.copy_(torch.linspace(-0.3, 1.4, 16))
            self.act2.weight.copy_(torch.linspace(0.05, 0.6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return self.act2(self.head(self.pool(y))).flatten(1)


def _prepared(model, x):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from toolchain.quantize.pt2e import xnnpack_quantizer

    return prepare_pt2e(torch.export.export(model, (x,), strict=False).module(), xnnpack_quantizer(Int8Options()))


@pytest.mark.parametrize("name", ["mobilefacenet", "vargfacenet"])
def test_backbone_prelus_are_annotated_int8(name):
    from toolchain.quantize.pt2e import float_ops

    x = torch.randn(1, 3, 112, 112)
    prepared = _prepared(build_model(name).eval(), x)
    assert float_ops(prepared)[0] == {}
    prelus = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.prelu.default]
    assert len(prelus) == sum(isinstance(m, nn.PReLU) for m in build_model(name).modules()) > 0
    for n in prelus:
        slope_observer = getattr(prepared, n.args[1].target)
        assert slope_observer.qscheme == torch.per_tensor_symmetric  # XNNPACK's int8 PReLU slope
        assert "activation_post_process" in str(next(iter(n.users)).target)  # its own output range


def test_prelu_in_a_float_layer_stays_float():
    from toolchain.quantize.pt2e import float_ops, quantize_xnnpack_int8

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    report = {}
    quantize_xnnpack_int8(_Prelus().eval(), torch.zeros(1, 3, 32, 32), images, (0.5,) * 3, (0.5,) * 3,
                          report=report, int8=Int8Options(float_layers=("act",)))
    assert report["float_ops"] == {"prelu": 1}, report
    assert float_ops(_prepared(_Prelus().eval(), torch.zeros(1, 3, 32, 32)))[0] == {}


@pytest.mark.slow
def test_int8_pte_runs_prelu_in_xnnpack_and_matches_the_reference(check_int8_pte):
    torch.manual_seed(0)
    check_int8_pte(_Prelus().eval())
