"""Threshold-aligned int8 output: rounding alone never flips a decision."""

import numpy as np
import pytest

from toolchain.quantize.decision import decision_preserved, threshold_aligned_qparams


@pytest.mark.parametrize("threshold", [0.2575, -0.1164, 3.7, 0.004, -12.0])
def test_rounding_keeps_every_decision_once_aligned(threshold):
    scale, zp = 0.0906, 101  # a calibrated range of about [-20.7, 2.4]
    logits = threshold + np.linspace(-0.3, 0.3, 2000)  # (an exact tie at the edge is measure-zero)
    before = sum(not decision_preserved(x, threshold, scale, zp) for x in logits)
    new_scale, new_zp = threshold_aligned_qparams(scale, zp, threshold)
    after = sum(not decision_preserved(x, threshold, new_scale, new_zp) for x in logits)
    assert after == 0
    if abs(threshold) > scale:  # the calibrated grid does flip some; the scale moves little
        assert before > 0 and 0.6 < new_scale / scale < 1.5
    q_thr = threshold / new_scale + new_zp
    assert -120 <= q_thr <= 119  # the threshold stays well inside the int8 range


def test_zero_threshold_keeps_calibration():
    assert threshold_aligned_qparams(0.1, 5, 0.0) == (0.1, 5)
