"""The diagnosis scorers: trunk cosine and the fitted-head upper bound."""

from __future__ import annotations

import numpy as np

from toolchain.evaluate.diagnose import head_upper_bound_scores


def test_upper_bound_fits_each_person_without_the_probe():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8))
    labels = np.repeat(np.arange(12), 5)
    feats = centres[labels] + 0.3 * rng.normal(size=(60, 8))
    negatives = rng.normal(size=(200, 8)) * 1.5
    ia = np.arange(0, 60, 5)
    ib_same, ib_diff = ia + 1, (ia + 5) % 60
    same = head_upper_bound_scores(feats, labels, ia, ib_same, negatives)
    diff = head_upper_bound_scores(feats, labels, ia, ib_diff, negatives)
    assert (same > diff).mean() > 0.9  # a person's fitted head scores them above others
    # the probe b is left out of the fit: a head fitted with only a itself still scores b
    two = np.repeat(np.arange(2), 2)
    s = head_upper_bound_scores(feats[[0, 1, 5, 6]], two, np.array([0]), np.array([1]), negatives)
    assert np.isfinite(s).all()
