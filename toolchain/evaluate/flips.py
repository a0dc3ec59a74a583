"""How many decisions an artifact's score noise should flip, predicted from the float scores alone.

A pair whose float score s lies |s - t| from the decision threshold t flips when the artifact's
score crosses t. With score noise of std sigma (int8 score - float score, per pair), that happens
with probability about Phi(-|s - t| / sigma), so the flips to expect are the sum over the pairs.
On the backbone recipes' 1,200 pairs this predicted the int8 files' measured flips within a few
pairs (README, "The other recipes, end to end"). Inverted, it gives the noise budget: the score
noise at which the expected flips equal what the agreement bound allows. A file over its budget
fails agreement by more than chance, and the gap says how much quieter its int8 scores must get.
"""

from __future__ import annotations

import math

import numpy as np


def allowed_flips(pairs: int, min_agreement: float) -> int:
    """The most decisions of `pairs` that may flip at `min_agreement` percent agreement."""
    return int(math.floor(pairs * (100.0 - min_agreement) / 100.0 + 1e-9))


def expected_flips(float_scores, threshold: float, noise: float) -> float:
    """Flips expected when each score moves by Gaussian noise of std `noise` (0: none)."""
    if noise <= 0:
        return 0.0
    distance = np.abs(np.asarray(float_scores, dtype=np.float64) - threshold) / noise
    # Phi(-d) = erfc(d / sqrt 2) / 2; math.erfc keeps this free of a scipy dependency.
    return float(sum(0.5 * math.erfc(d / math.sqrt(2.0)) for d in distance))


def noise_budget(float_scores, threshold: float, flips: float) -> float:
    """The largest score noise whose expected flips stay within `flips` (0.0 when even the
    faintest noise expects more, e.g. with pairs sitting on the threshold)."""
    scores = np.asarray(float_scores, dtype=np.float64)
    if len(scores) == 0:
        return 0.0
    # Expected flips grow monotonically with the noise: bisect between nothing and the scores' span.
    low, high = 0.0, float(np.abs(scores - threshold).max()) + 1.0
    if expected_flips(scores, threshold, high) <= flips:
        return high
    for _ in range(60):
        mid = (low + high) / 2
        if expected_flips(scores, threshold, mid) <= flips:
            low = mid
        else:
            high = mid
    return low
