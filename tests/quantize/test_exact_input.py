"""The exact-int8-input fold: the same function in float, the int8 input grid pinned."""

import numpy as np
import pytest
import torch

from toolchain.models import build_model
from toolchain.quantize.exact_input import EXACT_MEAN, fold_input_normalisation
from toolchain.runtime.preprocess import model_input


def test_fold_is_exact_in_float_and_moves_pixels_onto_the_int8_grid():
    torch.manual_seed(0)
    model = build_model("verifier").eval()
    before = model.input_conv.weight.detach().clone()
    folded = fold_input_normalisation(model)
    assert folded is not None and folded.spec.mean == (EXACT_MEAN,) * 3 and model.spec.mean == (0.5,) * 3
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy(model_input(images, model.spec.mean, model.spec.std))
    x_new = torch.from_numpy(model_input(images, folded.spec.mean, folded.spec.std))
    # q = p - 128 exactly: the new input sits on the 1/128 grid (the old one was half a step off)
    assert torch.allclose(x_new * 128, torch.round(x_new * 128), atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x_new), atol=1e-4)
    assert torch.equal(model.input_conv.weight, before)  # the original is untouched


def test_models_with_a_padded_first_conv_are_left_alone():
    model = build_model("mobilefacenet").eval()
    assert fold_input_normalisation(model) is None


def test_pin_input_qparams_sets_the_input_quantisation():
    from toolchain.quantize.pt2e import quantize_xnnpack_int8

    torch.manual_seed(0)
    folded = fold_input_normalisation(build_model("verifier").eval())
    images = np.random.default_rng(1).integers(100, 150, (3, 112, 112, 3), dtype=np.uint8)  # a narrow range
    example = torch.zeros(1, 3, 112, 112)
    converted = quantize_xnnpack_int8(folded, example, images, folded.spec.mean, folded.spec.std,
                                      input_qparams=(1 / 128, 0))
    from toolchain.export.executorch import _first_quant_params

    q_in, _ = _first_quant_params(converted)
    assert q_in["scale"] == pytest.approx(1 / 128) and q_in["zero_point"] == 0


def test_output_aligned_with_the_threshold_in_the_pt2e_graph():
    from toolchain.export.executorch import _first_quant_params
    from toolchain.quantize.pt2e import quantize_xnnpack_int8

    torch.manual_seed(0)
    model = build_model("verifier").eval()
    images = np.random.default_rng(2).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    converted = quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), images, model.spec.mean,
                                      model.spec.std, output_threshold=0.123)
    _, q_out = _first_quant_params(converted)
    steps = 0.123 / q_out["scale"] + q_out["zero_point"]
    assert abs(steps - np.floor(steps) - 0.5) < 1e-6
