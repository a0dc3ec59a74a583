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


def test_bias_int32_is_xnnpack_arithmetic():
    """The int32 bias equals what ExecuTorch's XNNPACK serializer writes for the float bias
    (quantize_per_channel: round(b * (1 / scale)) in float32), including the values where
    dividing by the scale rounds the other way."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers quantized_decomposed)

    from toolchain.quantize.head import bias_int32

    rng = np.random.default_rng(0)
    scale = (rng.uniform(1e-5, 1e-3, 20000)).astype(np.float32)
    # Quotients near a half, where the two roundings can part.
    bias = ((rng.integers(-5000, 5000, 20000) + 0.5) * scale).astype(np.float32)
    by_division = np.rint(bias / scale).astype(np.int64)
    torch_q = torch.ops.quantized_decomposed.quantize_per_channel(
        torch.from_numpy(bias), torch.from_numpy(scale), torch.zeros(20000, dtype=torch.int64), 0,
        -(2 ** 31), 2 ** 31 - 1, torch.int32).numpy()
    assert (by_division != torch_q).any()  # the case exists: division is not what the .pte holds
    assert np.array_equal(bias_int32(bias, scale), torch_q)
