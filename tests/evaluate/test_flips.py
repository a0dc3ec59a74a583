import math

import numpy as np
import pytest

from toolchain.evaluate.flips import allowed_flips, expected_flips, noise_budget


def test_allowed_flips_follow_the_agreement_bound():
    assert allowed_flips(1200, 99.5) == 6
    assert allowed_flips(197, 99.5) == 0  # the verifier recipe's probes: one flip breaks 99.5%
    assert allowed_flips(40, 0) == 40
    assert allowed_flips(1200, 100) == 0


def test_expected_flips_of_one_pair_is_the_gaussian_tail():
    phi = 0.5 * math.erfc(2 / math.sqrt(2))  # Phi(-2)
    assert expected_flips([0.52], 0.5, 0.01) == pytest.approx(phi)
    assert expected_flips([0.48], 0.5, 0.01) == pytest.approx(phi)  # either side of the threshold
    assert expected_flips([0.52, 0.9], 0.5, 0.0) == 0.0


def test_expected_flips_match_simulated_noise():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.4, 0.15, 1200)
    sigma, thr = 0.008, 0.4
    simulated = [np.sum((scores > thr) != (scores + rng.normal(0, sigma, scores.shape) > thr)) for _ in range(400)]
    assert expected_flips(scores, thr, sigma) == pytest.approx(np.mean(simulated), rel=0.05)


def test_noise_budget_inverts_expected_flips():
    rng = np.random.default_rng(1)
    scores, thr = rng.normal(0.4, 0.15, 1200), 0.4
    budget = noise_budget(scores, thr, 6)
    assert 0 < budget < 0.1
    assert expected_flips(scores, thr, budget) == pytest.approx(6, abs=1e-6)
    assert expected_flips(scores, thr, budget * 1.01) > 6
    # more allowed flips, more noise allowed
    assert noise_budget(scores, thr, 12) > budget


def test_noise_budget_is_zero_when_a_pair_sits_on_the_threshold():
    # a pair exactly at the threshold flips half the time at any noise
    assert noise_budget([0.5, 0.9, 0.1], 0.5, 0) == 0.0
    assert noise_budget([], 0.5, 3) == 0.0
