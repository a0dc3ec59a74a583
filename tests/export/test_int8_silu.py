"""SiLU and sigmoid in int8 inside ExecuTorch's XNNPACK partition: SiLU written as x * sigmoid(x)
(toolchain.export.int8_silu), sigmoid annotated on XNNPACK's fixed output grid
(toolchain.quantize.pt2e) and handed over by the partitioner (toolchain.export.executorch)."""

import pytest
import torch
from torch import nn

from toolchain.export.int8_silu import SiLUAsSigmoidMul, with_int8_silu
from toolchain.models import build_model


class _Gated(nn.Module):
    """conv -> SiLU -> squeeze-excitation gate (sigmoid, multiply) -> conv: SeesawFaceNet's
    float islands in one small net."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.act = nn.SiLU()
        self.gate = nn.Conv2d(16, 16, 1)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.out(y).mean((2, 3), keepdim=True).flatten(1)


def test_silu_rewrite_equal_in_float():
    torch.manual_seed(0)
    model = build_model("seesawfacenet").eval()
    rewritten = with_int8_silu(model)
    assert not any(isinstance(m, nn.SiLU) for m in rewritten.modules())
    assert sum(isinstance(m, SiLUAsSigmoidMul) for m in rewritten.modules()) == \
        sum(isinstance(m, nn.SiLU) for m in model.modules()) > 0
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref, out = model(x), rewritten(x)
    assert torch.allclose(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()))
    assert with_int8_silu(build_model("mobilefacenet")) is None


def test_sigmoid_gets_the_fixed_int8_grid_and_no_float_op_is_left():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from toolchain.quantize.int8_options import Int8Options
    from toolchain.quantize.pt2e import SIGMOID_SCALE, SIGMOID_ZERO_POINT, float_ops, xnnpack_quantizer

    x = torch.randn(1, 3, 32, 32)
    counts = {}
    for name, model in (("plain", _Gated().eval()), ("rewritten", with_int8_silu(_Gated().eval()))):
        prepared = prepare_pt2e(torch.export.export(model, (x,), strict=False).module(), xnnpack_quantizer(Int8Options()))
        counts[name] = float_ops(prepared)[0]
        sigmoids = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.sigmoid.default]
        for s in sigmoids:
            observer = getattr(prepared, next(iter(s.users)).target)
            scale, zero_point = observer.calculate_qparams()
            assert float(scale) == SIGMOID_SCALE and int(zero_point) == SIGMOID_ZERO_POINT
    # SiLU itself is not annotated (and the mean reading it stays float too); the sigmoid is.
    assert counts["plain"].get("silu") == 1 and "sigmoid" not in counts["plain"], counts
    assert counts["rewritten"] == {}, counts


@pytest.mark.slow
def test_int8_pte_runs_sigmoid_in_xnnpack_and_matches_the_reference(check_int8_pte):
    torch.manual_seed(0)
    check_int8_pte(with_int8_silu(_Gated().eval()))
