"""The int8 artifacts' row-stem form of a patchify stem computes what the plain conv computes."""

import pytest
import torch
from torch import nn

from toolchain.export.row_stem import RowStem, is_patchify, with_row_stem
from toolchain.models import build_model


@pytest.mark.parametrize("k,c_in,c_out", [(4, 3, 16), (2, 3, 8), (4, 5, 7)])
def test_row_stem_equals_the_conv(k, c_in, c_out):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, k)
    x = torch.randn(2, c_in, 8 * k, 8 * k)
    assert torch.allclose(RowStem(conv)(x), conv(x), atol=1e-5)


def test_only_patchify_stems_qualify():
    assert is_patchify(nn.Conv2d(3, 16, 4, 4), 112)
    assert not is_patchify(nn.Conv2d(3, 16, 3, 2, 1), 112)  # overlapping, padded (MobileFaceNet's)
    assert not is_patchify(nn.Conv2d(3, 16, 4, 4), 110)  # does not tile the width
    assert not is_patchify(nn.Conv2d(3, 16, 4, 4, padding=1), 112)
    assert not is_patchify(nn.Conv2d(3, 3, 4, 4, groups=3), 112)
    assert with_row_stem(build_model("mobilefacenet"), 112) is None


def test_verifier_with_row_stem_is_the_same_function_and_leaves_the_original():
    torch.manual_seed(0)
    model = build_model("verifier").eval()
    rewritten = with_row_stem(model, 112)
    assert isinstance(rewritten.input_conv, RowStem) and isinstance(model.input_conv, nn.Conv2d)
    assert rewritten.spec == model.spec
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), model(x), atol=1e-5)
