import math

import numpy as np
import pytest

from toolchain.evaluate.flips import (agreement_target, allowed_flips, expected_flips, flips_within, noise_budget,
                                      score_noise_at)


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


def test_flips_within_is_the_poisson_mean_at_the_risk():
    def tail(mean, allowed):  # P(count > allowed)
        return 1 - sum(math.exp(-mean) * mean ** k / math.factorial(k) for k in range(allowed + 1))

    for allowed in (0, 6, 30):
        aim = flips_within(allowed, 0.05)
        assert 0 < aim < allowed + 1
        assert tail(aim, allowed) == pytest.approx(0.05, abs=1e-6)
        assert tail(aim + 0.05, allowed) > 0.05
    assert flips_within(30, 0.05) < flips_within(30, 0.2)  # a larger risk allows more
    assert flips_within(-1, 0.05) == 0.0


def _noisy_embeddings(rng, n, dim, sigma):
    """Unit embeddings in identity clusters (pairs of one person score high), and the same with
    Gaussian noise of std `sigma` per coordinate, normalised again."""
    centres = rng.normal(size=(n // 4, dim))
    f = np.repeat(centres, 4, axis=0) + 0.6 * rng.normal(size=(n, dim))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    e = f + rng.normal(0, sigma, f.shape)
    return e / np.linalg.norm(e, axis=1, keepdims=True), f


def test_score_noise_at_a_threshold_is_read_from_pairs_far_from_it():
    rng = np.random.default_rng(0)
    e, f = _noisy_embeddings(rng, 400, 64, 0.002)
    upper = np.triu_indices(len(f), 1)
    s, error = (f @ f.T)[upper], (e @ e.T - f @ f.T)[upper]
    near = np.abs(s - 0.7) < 0.03
    assert near.sum() > 100
    predicted = score_noise_at(e, f, 0.7)
    assert predicted == pytest.approx(error[near].std(), rel=0.1)
    # Pairs of different people (scores about 0) are noisier than pairs at the threshold, so
    # the raw std over all pairs would overstate it.
    assert error.std() > 1.2 * predicted
    assert score_noise_at(f, f, 0.7) == 0.0
    assert math.isnan(score_noise_at(f[:1], f[:1], 0.7))  # no pair: nothing measured
    assert score_noise_at(e, f, 0.9) < predicted  # the noise shrinks towards a score of 1


def test_the_agreement_target_is_the_noise_whose_expected_flips_stay_within_the_bound_at_the_risk():
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 600)
    scores = np.where(issame, rng.normal(0.7, 0.1, 1200), rng.normal(0.3, 0.1, 1200))
    loose, strict = agreement_target(scores, issame, 99.0), agreement_target(scores, issame, 99.5)
    assert loose["allowed_flips"] == 12 and strict["allowed_flips"] == 6 and strict["pairs"] == 1200
    assert 0.4 < strict["score_threshold"] < 0.6 and strict["risk"] == 0.05
    assert 0 < strict["max_score_noise"] < loose["max_score_noise"]
    assert strict["expected_flips"] == pytest.approx(flips_within(6, 0.05))
    at_budget = expected_flips(scores, strict["score_threshold"], strict["max_score_noise"])
    assert at_budget == pytest.approx(strict["expected_flips"], rel=1e-3)
