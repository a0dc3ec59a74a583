"""The int8 fallback's agreement target, read from the float model on identity pairs."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.evaluate.flips import expected_flips
from toolchain.models.registry import ModelSpec
from toolchain.quantize import agreement
from toolchain.quantize.agreement import agreement_images, agreement_pairs, agreement_target


def test_the_images_are_whole_identities_up_to_the_cap(monkeypatch):
    labels = np.repeat(np.arange(100), 5)
    assert len(agreement_images(labels, seed=0)) == 500  # under the cap: every image
    monkeypatch.setattr(agreement, "AGREEMENT_IMAGES", 52)
    used = agreement_images(labels, seed=0)
    assert len(used) == 50 and len(np.unique(labels[used])) == 10  # whole identities only
    assert not np.array_equal(agreement_images(labels, seed=1), used)


def test_pairs_are_balanced_with_look_alike_mismatches():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 4)
    centres = rng.normal(size=(30, 8))
    embeddings = np.repeat(centres, 4, axis=0) + 0.1 * rng.normal(size=(120, 8))
    rows = agreement_pairs(labels, embeddings, seed=0)
    assert len(rows) == 360 and rows[:, 2].sum() == 180  # 30 people x 6 matched pairs each, as many mismatched
    same = labels[rows[:, 0]] == labels[rows[:, 1]]
    assert np.array_equal(same, rows[:, 2].astype(bool))


def test_pairs_need_people_with_two_images():
    with pytest.raises(ToolchainError, match="agreement target"):
        agreement_pairs(np.arange(30), np.zeros((30, 4)), seed=0)  # one image each: no matched pair
    with pytest.raises(ToolchainError, match="agreement target"):
        agreement_pairs(np.zeros(30, dtype=int), np.zeros((30, 4)), seed=0)  # one person


class _Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(1), nn.Linear(32, 16))
        self.spec = ModelSpec(name="tiny", output="embedding", output_dim=16)

    def forward(self, x):
        return self.body(x)


def test_the_budget_is_the_noise_whose_expected_flips_meet_the_bound_at_the_risk():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # 20 people: each one's images are noisy copies of their own face, so pairs separate.
    faces = rng.integers(0, 256, (20, 1, 112, 112, 3)).astype(np.float64)
    images = np.clip(faces + rng.normal(0, 40, (20, 6, 112, 112, 3)), 0, 255).astype(np.uint8).reshape(120, 112, 112, 3)
    labels = np.repeat(np.arange(20), 6)
    model = _Embedder().eval()
    loose = agreement_target(model, images, labels, (0.5,) * 3, (0.5,) * 3, parity_pairs=6000, min_agreement=99.0)
    strict = agreement_target(model, images, labels, (0.5,) * 3, (0.5,) * 3, parity_pairs=6000, min_agreement=99.9)
    assert loose["allowed_flips"] == 60 and strict["allowed_flips"] == 6
    assert 0 < strict["max_score_noise"] < loose["max_score_noise"]
    assert strict["expected_flips"] < 6 and loose["pairs"] == 600 and loose["images"] == 120
    assert -1 <= loose["score_threshold"] <= 1 and 50 < loose["float_accuracy"] <= 100
    # At the budget, the pairs' expected flips scaled to the parity's count are the aim.
    from toolchain.quantize.sensitivity import mirrored_embeddings

    e = mirrored_embeddings(model, images, 16, (0.5,) * 3, (0.5,) * 3)
    rows = agreement_pairs(labels, e, 0)
    scores = np.sum(e[rows[:, 0]] * e[rows[:, 1]], axis=1)
    got = expected_flips(scores, loose["score_threshold"], loose["max_score_noise"]) * 6000 / len(scores)
    assert got == pytest.approx(loose["expected_flips"], rel=1e-3)
