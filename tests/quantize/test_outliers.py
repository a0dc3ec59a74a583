"""Calibration images on which the float model's activations explode are left out
(toolchain.quantize.outliers), and the int8 ranges then fit the other images."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.quantize.outliers import activation_peaks, screen_outliers

MEAN = STD = (0.5, 0.5, 0.5)


class Amplifier(nn.Module):
    """A model that turns a saturated red image into activations far above the rest, as the
    briefly trained VarGFaceNet did: a red-minus-green feature, squared."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0 / 9
            self.conv.weight[0, 1] = -1.0 / 9
            self.conv.weight[1:, :] = 0.05
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        y = self.act(self.conv(x))
        y = y * y * 50  # the explosion: quadratic in the red-green gap
        return self.head(y.mean(dim=(2, 3)))


def _images(red: int = 1, n: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(100, 156, (n, 16, 16, 3), dtype=np.uint8)
    images[:red, ..., 0], images[:red, ..., 1] = 255, 0
    return images


def test_peaks_cover_every_leaf_module_and_image():
    names, peaks = activation_peaks(Amplifier().eval(), _images(), MEAN, STD)
    assert names == ["conv", "act", "head"] and peaks.shape == (16, 3)
    assert peaks[0, 1] > 10 * np.median(peaks[:, 1])  # the red image at the ReLU


def test_the_exploding_image_is_left_out_and_the_rest_kept():
    images = _images(red=1)
    kept, report = screen_outliers(Amplifier().eval(), images, MEAN, STD, factor=8.0)
    assert len(kept) == 15 and [d["image"] for d in report["left_out"]] == [0]
    assert report["left_out"][0]["ratio"] > 8 and report["left_out"][0]["layer"] in ("act", "head", "conv")
    np.testing.assert_array_equal(kept, images[1:])


def test_a_typical_set_loses_nothing():
    kept, report = screen_outliers(Amplifier().eval(), _images(red=0), MEAN, STD, factor=8.0)
    assert len(kept) == 16 and report["left_out"] == []


def test_a_factor_that_would_drop_half_the_set_is_refused():
    with pytest.raises(ToolchainError, match="outlier_factor 1.01"):
        screen_outliers(Amplifier().eval(), _images(red=0), MEAN, STD, factor=1.01)


def test_leaving_the_outlier_out_brings_the_int8_graph_closer_to_float():
    """torch's reference int8 graph of the model, calibrated with and without the outlier,
    measured on typical images: the screened calibration has the smaller error."""
    from toolchain.quantize.int8_options import Int8Options
    from toolchain.quantize.pt2e import quantize_xnnpack_int8
    from toolchain.runtime.preprocess import model_input

    model = Amplifier().eval()
    calib = _images(red=1, n=16)
    screened, _ = screen_outliers(model, calib, MEAN, STD, factor=8.0)
    test = torch.from_numpy(model_input(_images(red=0, n=16, seed=1), MEAN, STD))
    example = torch.zeros(1, 3, 16, 16)
    errors = []
    for images in (calib, screened):
        q = quantize_xnnpack_int8(model, example, images, MEAN, STD, int8=Int8Options(calibration="minmax"))
        with torch.no_grad():  # the PT2E graph takes one image at a time
            errors.append(float(np.mean([(q(x[None]) - model(x[None])).abs().mean() for x in test])))
    assert errors[1] < 0.5 * errors[0], errors
