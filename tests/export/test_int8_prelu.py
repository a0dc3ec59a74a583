"""The int8 form of PReLU (toolchain.export.int8_prelu): equal in float, and no float op left
for ExecuTorch's XNNPACK quantizer."""

import pytest
import torch
from torch import nn

from toolchain.export.int8_prelu import Int8PReLU, with_int8_prelu
from toolchain.models import build_model


def _slopes(model, low, high):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(low, high)
    return model


@pytest.mark.parametrize("low,high", [(-0.3, 0.6), (0.5, 1.8)])  # the second has slopes > 1: sign conv
def test_equal_in_float(low, high):
    torch.manual_seed(0)
    prelu = _slopes(nn.PReLU(6), low, high)
    rewritten = Int8PReLU(prelu)
    assert (rewritten.sign is not None) == (high > 1)
    for shape in ((3, 6, 5, 5), (3, 6)):
        x = torch.randn(*shape) * 3
        with torch.no_grad():
            assert torch.allclose(rewritten(x), prelu(x), atol=1e-5)


@pytest.mark.parametrize("name", ["mobilefacenet", "vargfacenet"])
def test_backbone_equal_and_no_float_island(name):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from toolchain.quantize.pt2e import float_ops

    torch.manual_seed(0)
    model = _slopes(build_model(name).eval(), -0.3, 1.4)
    rewritten = with_int8_prelu(model)
    assert not any(isinstance(m, nn.PReLU) for m in rewritten.modules())
    assert any(isinstance(m, nn.PReLU) for m in model.modules())  # the original is untouched
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref, out = model(x), rewritten(x)
    assert torch.allclose(out, ref, atol=1e-5 * max(1.0, ref.abs().max().item()))
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    inside = {}
    for m in (model, rewritten):
        prepared = prepare_pt2e(torch.export.export(m, (x[:1],), strict=False).module(), quantizer)
        inside[m is rewritten] = float_ops(prepared)[0]
    assert inside[False].get("prelu", 0) > 0 and "prelu" not in inside[True], inside


def test_nothing_to_rewrite():
    assert with_int8_prelu(build_model("verifier")) is None
