"""The per-user head's int8 values (toolchain.quantize.head): one function for every writer."""

import numpy as np
import pytest
import torch

from toolchain.errors import ToolchainError
from toolchain.models.verifier import Verifier
from toolchain.quantize.decision import decision_preserved
from toolchain.quantize.head import quantize_head


@pytest.fixture
def verifier_and_features():
    torch.manual_seed(0)
    v = Verifier().eval()
    with torch.no_grad():
        feats = v.features(torch.randn(64, 3, 112, 112)).numpy()
    return v, feats


def test_values_follow_the_int8_scheme(verifier_and_features):
    v, feats = verifier_and_features
    state = v.state_dict()
    head = quantize_head(state, v.per_user_tensors(), feats, feature_scale=0.004, threshold=0.3)
    first, last = head.layers
    w = state["head.0.weight"].numpy()
    assert first.weight_q.dtype == np.int8 and np.abs(first.weight_q).max() <= 127
    assert np.abs(first.weight_q * first.weight_scale[:, None] - w).max() <= first.weight_scale.max() / 2 + 1e-7
    assert np.allclose(first.bias_q * first.bias_scale, state["head.0.bias"].numpy(), atol=first.bias_scale.max())
    assert first.input_scale == pytest.approx(0.004) and last.input_scale == first.output_scale
    assert first.output_zero_point == -128  # after ReLU: [0, max]
    # The threshold sits on a bin edge of the output: rounding never flips a decision.
    # Here every calibration logit is below it (|logit| < 0.1): the range still holds it.
    scale, zp = head.output
    assert head.layers[-1].weight.shape == (1, 64)
    for logit in np.linspace(0.25, 0.35, 100):
        assert decision_preserved(float(logit), 0.3, scale, zp)


def test_same_inputs_same_bytes(verifier_and_features):
    v, feats = verifier_and_features
    a = quantize_head(v.state_dict(), v.per_user_tensors(), feats, 0.004, 0.3)
    b = quantize_head({k: t.clone() for k, t in v.state_dict().items()}, v.per_user_tensors(), feats.copy(), 0.004, 0.3)
    for x, y in zip(a.layers, b.layers):
        assert x.weight_q.tobytes() == y.weight_q.tobytes() and x.bias_q.tobytes() == y.bias_q.tobytes()
        assert (x.output_scale, x.output_zero_point) == (y.output_scale, y.output_zero_point)


def test_per_user_trunk_tensors_are_refused(verifier_and_features):
    _, feats = verifier_and_features
    v = Verifier(film=True)
    with pytest.raises(ToolchainError, match="per-user head tensors only"):
        quantize_head(v.state_dict(), v.per_user_tensors(), feats, 0.004, 0.3)
