"""int8 output quantisation aligned with a verifier's decision threshold.

The int8 logit can only take the values (q - zero_point) * scale. With a calibrated range, the
threshold usually falls inside one of those bins, and every float logit in that bin on the
wrong side of the threshold is rounded across it: a flipped decision caused by the output's
rounding alone (on the demo's verifier, 5 of 6 flipped decisions). Choosing the scale so that
the threshold sits on a bin edge, threshold = (k + 0.5) * scale, makes the rounding keep every
decision; only the error from inside the network can still flip one. The range stays close to
the calibrated one: the scale changes by at most a factor (k + 0.5) / k.
"""

from __future__ import annotations

import math

from toolchain.errors import ToolchainError

QMIN, QMAX = -128, 127


def threshold_aligned_qparams(scale: float, zero_point: int, threshold: float) -> tuple[float, int]:
    """(scale, zero_point) near the calibrated ones with `threshold` half-way between two int8
    steps. The zero-point is re-chosen so the calibrated range stays covered where possible
    and the threshold is at least a few steps inside it."""
    if not (scale > 0 and math.isfinite(scale) and math.isfinite(threshold)):
        raise ToolchainError(f"output quantisation: bad scale {scale} or threshold {threshold}")
    t = abs(threshold)
    if t < 1e-6:
        # 0 is a grid point for every scale, never a bin edge: leave the calibrated parameters.
        return float(scale), int(zero_point)
    lo = (QMIN - zero_point) * scale
    k = max(0, round(t / scale - 0.5))
    new_scale = t / (k + 0.5)
    # Keep the calibrated low end when it fits; always keep the threshold 8 steps from either end.
    zp = round(QMIN - lo / new_scale)
    q_thr = threshold / new_scale
    zp = min(max(zp, QMIN + 8 - math.floor(q_thr)), QMAX - 8 - math.ceil(q_thr))
    # (The top of the calibrated range may be cut: logits far above the threshold saturate on
    # the accept side, which keeps their decision.)
    zp = min(max(zp, QMIN), QMAX)
    return float(new_scale), int(zp)


def decision_preserved(logit: float, threshold: float, scale: float, zero_point: int) -> bool:
    """Does int8 rounding of `logit` keep its side of `threshold`? (for tests and checks)"""
    q = min(max(round(logit / scale) + zero_point, QMIN), QMAX)
    return ((q - zero_point) * scale >= threshold) == (logit >= threshold)
