"""The int8 fallback's agreement target: the score noise at which the parity's decision-agreement
bound still holds, read from the float model before any int8 file exists.

The cosine bounds do not imply agreement. VarGFaceNet's int8 files met the cosine targets with
nothing in float (mean 0.9996) and still flipped 25 to 32 of 6,000 decisions where 30 are
allowed, because many of its pairs sit near the threshold (README, the other recipes). Flips
follow from the score noise and the density of float scores near the threshold
(toolchain.evaluate.flips). This module reads that density from verification pairs of the
recipe's identity images, built as the toolchain builds held-out pairs (toolchain.data.split):
half matched, and half the mismatched ones look-alikes in the float model's embedding space.
From them come the threshold, and the noise whose expected flips on the parity's pair count stay
within the bound all but AGREEMENT_RISK of the time. The fallback then measures the int8 noise at
that threshold on its measuring images (flips.score_noise_at) and keeps units in float until it
is within the budget. Identity images are not parity's pairs, so nothing of the held-out pairs
reaches the export.

Look-alikes need many identities: on VarGFaceNet's recipe, 2,400 pairs among 60 of its 240 identities
scored 97.50% in float with a budget of 0.0205 for 30 flips of 6,000; among all 240, 95.63% and
0.0076, where its parity pairs (100 other identities, half the mismatched ones of one family)
score 95.15% with 0.0081. So the pairs use every identity image, up to AGREEMENT_IMAGES.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.evaluate.flips import allowed_flips, flips_within, noise_budget
from toolchain.evaluate.metrics import verification_metrics

AGREEMENT_RISK = 0.05  # how often a file at the budget may still flip more than allowed
AGREEMENT_IMAGES = 2400  # identity images the pairs are drawn from, whole identities at a time
AGREEMENT_PAIRS = 6000  # at most; fewer where the identities hold fewer matched pairs
HARD_SHARE = 0.5  # of the mismatched pairs, look-alikes (as data.split.build_pairs and the synthetic pairs)


def agreement_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the identity images the pairs are built from: whole identities in a seeded
    order, up to AGREEMENT_IMAGES images."""
    labels = np.asarray(labels)
    people = np.random.default_rng(seed + 2).permutation(np.unique(labels))
    counts = np.array([np.sum(labels == p) for p in people])
    keep = people[:max(1, int(np.searchsorted(np.cumsum(counts), AGREEMENT_IMAGES, side="right")))]
    return np.flatnonzero(np.isin(labels, keep))


def agreement_pairs(labels: np.ndarray, embeddings: np.ndarray, seed: int) -> np.ndarray:
    """(n, 3) rows (image a, image b, issame) into `labels` / `embeddings`: as many matched pairs
    as mismatched, up to AGREEMENT_PAIRS in all (toolchain.data.split.build_pairs)."""
    from toolchain.data.split import build_pairs

    labels = np.asarray(labels)
    _, counts = np.unique(labels, return_counts=True)
    matched = int(np.sum(counts * (counts - 1) // 2))
    n = min(AGREEMENT_PAIRS, 2 * matched) // 20 * 20  # build_pairs' 10 balanced folds
    if n < 20 or len(counts) < 2:
        raise ToolchainError("the int8 fallback's agreement target needs identities with 2+ images each "
                             f"(10+ same-person pairs) and at least two identities; got {matched} same-person "
                             f"pairs among {len(counts)} identities")
    return build_pairs(labels, n, hard_share=HARD_SHARE, seed=seed, embeddings=embeddings)


def agreement_target(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean, std, *, parity_pairs: int,
                     min_agreement: float, seed: int = 0, batch: int = 16) -> dict:
    """The fallback's agreement target from the float `model` on identity `images` (uint8 NHWC)
    with their `labels`: {"score_threshold", "max_score_noise"} for the fallback, and what they
    were read from (pairs, float accuracy, the flips allowed and aimed at on `parity_pairs`)."""
    from toolchain.quantize.sensitivity import mirrored_embeddings

    used = agreement_images(labels, seed)
    who = np.asarray(labels)[used]
    e = mirrored_embeddings(model.eval(), images[used], batch, mean, std)
    rows = agreement_pairs(who, e, seed)
    scores = np.sum(e[rows[:, 0]] * e[rows[:, 1]], axis=1)
    metrics = verification_metrics(scores, rows[:, 2].astype(bool))
    threshold = float(metrics["threshold"])
    allowed = allowed_flips(parity_pairs, min_agreement)
    aim = flips_within(allowed, AGREEMENT_RISK)
    budget = noise_budget(scores, threshold, aim * len(scores) / parity_pairs)
    return {"score_threshold": threshold, "max_score_noise": budget, "pairs": int(len(scores)),
            "images": int(len(used)), "float_accuracy": 100.0 * float(metrics["accuracy"]),
            "parity_pairs": int(parity_pairs), "allowed_flips": int(allowed), "expected_flips": aim,
            "risk": AGREEMENT_RISK}
