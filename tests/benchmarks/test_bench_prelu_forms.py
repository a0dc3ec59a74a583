"""benchmarks/bench_prelu_forms.py: the forms it times compute PReLU in float, and its accuracy
column's cosine to float."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_prelu_forms", ROOT / "benchmarks" / "bench_prelu_forms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rewritten_forms_equal_prelu_in_float_for_slopes_below_one(bench):
    prelu = nn.PReLU(8)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(0.0, 0.9, 8))
    x = torch.randn(2, 8, 5, 5) * 3
    for form in (bench.ThreeOpPReLU, bench.MultiplyPReLU, bench.MaxPReLU):
        torch.testing.assert_close(form(prelu)(x), prelu(x), atol=1e-5, rtol=0)


def test_cosine_to_float_is_per_row_and_ignores_scale(bench):
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert bench.cosine_to_float(reference * 3, reference) == pytest.approx((1.0, 1.0))
    mean, low = bench.cosine_to_float(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), reference)
    assert low == pytest.approx(0.0, abs=1e-12) and mean == pytest.approx(2 / 3)


def test_the_measuring_faces_are_distinct_112_pixel_images(bench):
    images = bench.faces(4, 9000)
    assert images.shape == (4, 112, 112, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 4


def test_random_weights_get_per_channel_slopes_not_the_init_constant(bench):
    model = bench.random_slopes(nn.Sequential(nn.Conv2d(3, 16, 1), nn.PReLU(16)))
    slopes = model[1].weight.detach()
    assert len(set(slopes.tolist())) == 16 and float(slopes.min()) >= 0.05 and float(slopes.max()) < 0.45


def test_the_max_form_clamps_slopes_above_one(bench):
    """max(x, a*x) is PReLU only for a <= 1: a slope of 2 acts as 1 there, and the row says so."""
    prelu = nn.PReLU(2)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.5, 2.0]))
    x = torch.full((1, 2, 1, 1), -1.0)
    assert bench.MaxPReLU(prelu)(x).flatten().tolist() == [-0.5, -1.0]
