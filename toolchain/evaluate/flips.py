"""How many decisions an artifact's score noise should flip, predicted from the float scores alone.

A pair whose float score s lies |s - t| from the decision threshold t flips when the artifact's
score crosses t. With score noise of std sigma (int8 score - float score, per pair), that happens
with probability about Phi(-|s - t| / sigma), so the flips to expect are the sum over the pairs. On
the backbone recipes' 1,200 pairs this predicted the int8 files' measured flips within a few pairs
(docs/int8-backbones.md). Inverted, it gives the noise budget: the score noise at which the
expected flips equal what the agreement bound allows. A file over its budget fails agreement by
more than chance, and the gap says how much quieter its int8 scores must get.
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


def flips_within(allowed: int, risk: float) -> float:
    """The largest mean flip count whose Poisson count exceeds `allowed` with probability at most
    `risk`: what a file's expected flips may reach so that its measured flips stay within the
    agreement bound all but `risk` of the time (0.0 when even no flips would not)."""

    def tail(mean: float) -> float:  # P(count > allowed)
        term = total = math.exp(-mean)
        for k in range(1, allowed + 1):
            term *= mean / k
            total += term
        return 1.0 - total

    if allowed < 0 or tail(0.0) > risk:
        return 0.0
    low, high = 0.0, float(allowed) + 1.0
    for _ in range(60):  # the tail grows monotonically with the mean
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) <= risk else (low, mid)
    return low


def score_noise_at(embeddings, reference, threshold: float, max_score: float = 0.95) -> float:
    """The std of an artifact's pair-score error to expect at pair score `threshold`, read from
    every pair among the images: `embeddings` (the artifact's) and `reference` (float), rows
    L2-normalised.

    A pair's score error is about e_a.d_b + e_b.d_a for errors d orthogonal to the embeddings e,
    and the part of e_b orthogonal to e_a shrinks as sqrt(1 - s^2) with their score s. So each
    pair's error is divided by sqrt(1 - s^2), and their std is scaled back at the threshold. Few
    pairs of a random set of identity images score near a verification threshold, so this is
    how the noise there is read from them. On VarGFaceNet's recipe (export seed 0, torch's int8
    reference graph of the `.pte`), the fallback's 128 identity images (std 0.0093 over their
    pairs, nearly all of different people) predicted 0.0059 at the threshold 0.786; the
    `.pte`'s 427 parity pairs within 0.05 of it measured 0.0058. Pairs above `max_score` are
    left out: the division would magnify their few. NaN when fewer than two pairs remain: then
    nothing measures the noise, and a target on it is not met."""
    e = np.asarray(embeddings, dtype=np.float64)
    f = np.asarray(reference, dtype=np.float64)
    upper = np.triu_indices(len(f), 1)
    s = (f @ f.T)[upper]
    error = (e @ e.T)[upper] - s
    keep = np.abs(s) < max_score
    if keep.sum() < 2:
        return float("nan")
    return float(np.std(error[keep] / np.sqrt(1.0 - s[keep] ** 2)) * math.sqrt(max(0.0, 1.0 - threshold ** 2)))


AGREEMENT_RISK = 0.05  # how often an int8 file at the agreement budget may still flip more than allowed


def agreement_target(float_scores, issame, min_agreement: float, risk: float = AGREEMENT_RISK) -> dict:
    """The int8 fallback's agreement target, from the float model's scores of the verification
    pairs (those that set the decision threshold): {"score_threshold", "max_score_noise"}, the
    noise at which the expected flips stay within the bound's allowance all but `risk` of the
    time, and what they were read from.

    The cosine bounds do not imply agreement: VarGFaceNet's int8 files met them with nothing in
    float and flipped 25 to 32 of 6,000 decisions where 30 are allowed, because many of its
    pairs sit near the threshold. Only the float scores are read here; the fallback measures the
    int8 noise on its own identity images (score_noise_at). Pairs built from the identity images
    instead, half the mismatched ones look-alikes in the float embedding space, scored as the
    parity pairs do in float (95.08% against 95.15% on VarGFaceNet's recipe) but crowded the
    threshold: their budget, 0.0038, was two thirds of the parity pairs' (0.0060) for the same flips."""
    from toolchain.evaluate.metrics import verification_metrics

    scores = np.asarray(float_scores, dtype=np.float64)
    threshold = float(verification_metrics(scores, issame)["threshold"])
    allowed = allowed_flips(len(scores), min_agreement)
    aim = flips_within(allowed, risk)
    return {"score_threshold": threshold, "max_score_noise": noise_budget(scores, threshold, aim),
            "pairs": int(len(scores)), "allowed_flips": int(allowed), "expected_flips": aim, "risk": risk}
