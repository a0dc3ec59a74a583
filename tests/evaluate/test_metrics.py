"""Verification metrics on hand-computed cases."""

import json

import numpy as np
import pytest

from toolchain.errors import ToolchainError
from toolchain.evaluate.metrics import cross_pair_tar, roc_points, verification_metrics


def test_separable_scores_are_perfect():
    rng = np.random.default_rng(0)
    issame = np.tile([True] * 30 + [False] * 30, 10)
    scores = np.where(issame, rng.uniform(0.6, 1.0, issame.size), rng.uniform(-1.0, 0.4, issame.size))
    m = verification_metrics(scores, issame)
    assert m["accuracy"] == 1.0
    assert m["accuracy_std"] == 0.0
    assert m["auc"] == 1.0
    assert m["eer"] == 0.0
    assert m["tar_at_far"] == {"1e-3": 1.0, "1e-4": 1.0}
    assert 0.4 < m["threshold"] < 0.6
    json.dumps(m)  # JSON-friendly


def test_random_scores_are_chance():
    rng = np.random.default_rng(1)
    issame = np.tile([True] * 300 + [False] * 300, 10)
    scores = rng.normal(size=issame.size)
    m = verification_metrics(scores, issame)
    assert abs(m["accuracy"] - 0.5) < 0.04
    assert abs(m["auc"] - 0.5) < 0.03
    assert abs(m["eer"] - 0.5) < 0.03
    assert m["tar_at_far"]["1e-3"] < 0.02


def test_hand_computed_folds_and_threshold():
    # 10 folds of 2 pairs; a single overlap makes one fold wrong on one pair.
    scores = np.array([0.9, 0.1] * 10, dtype=float)
    issame = np.array([True, False] * 10)
    scores[0] = 0.05  # a matched pair scored below every mismatched one
    m = verification_metrics(scores, issame)
    # Fold 0 is tested with a threshold in (0.1, 0.9): its matched pair fails -> 0.5; others 1.0.
    assert m["fold_accuracies"][0] == 0.5
    assert m["fold_accuracies"][1:] == [1.0] * 9
    assert m["accuracy"] == pytest.approx(0.95)
    assert m["accuracy_std"] == pytest.approx(np.std([0.5] + [1.0] * 9))
    assert 0.1 < m["threshold"] < 0.9
    # AUC: the low matched pair ranks below all 10 negatives: 1 - 10/(10*10) = 0.9
    assert m["auc"] == pytest.approx(0.9)
    assert m["num_pairs"] == 20 and m["num_matched"] == 10 and m["num_mismatched"] == 10


def test_distances_equal_negated_similarities():
    rng = np.random.default_rng(2)
    issame = rng.random(400) < 0.5
    sim = rng.normal(size=400) + issame * 1.5
    a = verification_metrics(sim, issame)
    b = verification_metrics(-sim, issame, higher_is_same=False)
    assert a["accuracy"] == b["accuracy"] and a["auc"] == pytest.approx(b["auc"])
    assert b["threshold"] == pytest.approx(-a["threshold"])
    fpr, tpr, thr = roc_points(-sim, issame, higher_is_same=False)
    fpr2, tpr2, thr2 = roc_points(sim, issame)
    np.testing.assert_allclose(fpr, fpr2)
    np.testing.assert_allclose(thr, -thr2)
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)


def test_tar_at_far_uses_false_accept_budget():
    # 2000 negatives: FAR 1e-3 allows 2 false accepts; the 2 highest negatives beat half the positives.
    neg = np.linspace(0, 1, 2000)
    neg[-2:] = [5.0, 5.0]
    pos = np.concatenate([np.full(50, 4.0), np.full(50, 6.0)])
    scores = np.concatenate([pos, neg])
    issame = np.concatenate([np.ones(100, bool), np.zeros(2000, bool)])
    m = verification_metrics(scores, issame)
    assert m["tar_at_far"]["1e-3"] == 1.0  # threshold just under 4 admits both 5.0 negatives: FAR 1e-3
    assert m["tar_at_far"]["1e-4"] == 0.5  # no false accept allowed -> only the 6.0 positives
    assert m["far_resolution"] == pytest.approx(1 / 2000)


def test_eer_interpolates():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    issame = np.array([1, 1, 1, 0, 0, 0], bool)
    m = verification_metrics(scores, issame, n_folds=2)
    assert m["eer"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("scores,issame,msg", [
    ([0.1, 0.2], [True, True], "both matched and mismatched"),
    ([0.1, np.nan], [True, False], "NaN"),
    ([0.1, 0.2, 0.3], [True, False], "differ in length"),
    ([0.1, 0.2], [True, False], "cannot make 10 folds"),
])
def test_bad_input_is_refused(scores, issame, msg):
    with pytest.raises(ToolchainError, match=msg):
        verification_metrics(scores, issame)


def _lfw_order(n_folds=10, per=30):
    """LFW pairs.txt layout: each fold lists its matched pairs, then its mismatched ones."""
    return np.tile([True] * per + [False] * per, n_folds)


def test_balanced_contiguous_folds_are_kept():
    from toolchain.evaluate.metrics import fold_indices

    issame = _lfw_order()  # 600 pairs in 10 blocks of 60: every tenth balanced (insightface .bin order)
    folds, kind = fold_indices(issame)
    assert kind == "contiguous"
    assert [f.tolist() for f in folds] == [list(range(60 * k, 60 * k + 60)) for k in range(10)]
    m = verification_metrics(np.where(issame, 1.0, 0.0), issame)
    assert m["folds"] == "contiguous"


def test_unbalanced_tenths_get_stratified_folds():
    from toolchain.evaluate.metrics import fold_indices

    # LFW's pairs.txt order cut to 8 of its 10 folds: consecutive tenths are no longer balanced
    # (and a list of all matched pairs, then all mismatched, is the extreme case).
    for issame in (_lfw_order(8), np.repeat([True, False], 300)):
        folds, kind = fold_indices(issame)
        assert kind == "stratified"
        assert sorted(np.concatenate(folds).tolist()) == list(range(len(issame)))
        for f in folds:
            assert abs(issame[f].mean() - issame.mean()) <= 0.02
    # On the all-matched-first order contiguous folds would hold one class each: a score that
    # separates the classes perfectly must still come out perfect with stratified folds.
    issame = np.repeat([True, False], 300)
    rng = np.random.default_rng(0)
    scores = np.where(issame, rng.uniform(0.6, 1, 600), rng.uniform(0, 0.4, 600))
    m = verification_metrics(scores, issame)
    assert m["folds"] == "stratified" and m["accuracy"] == 1.0


def test_cross_pair_tar_is_the_step_roc_over_every_pair():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(12), 5)  # 60 images of 12 people: 1,770 pairs, 120 genuine
    centres = rng.normal(size=(12, 8))
    e = centres[ids] + rng.normal(scale=0.9, size=(60, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    got = cross_pair_tar(e, ids)
    i, j = np.triu_indices(60, 1)
    listed = verification_metrics(np.sum(e[i] * e[j], axis=1), ids[i] == ids[j])
    assert got["genuine"] == 120 and got["impostor"] == 1650 and got["far_resolution"] == 1 / 1650
    assert got["tar_at_far"] == listed["tar_at_far"]  # one false accept allowed at 1e-3, none at 1e-4
    assert got["tar_at_far"]["1e-4"] <= got["tar_at_far"]["1e-3"] and 0 < got["tar_at_far"]["1e-3"] < 1
    assert cross_pair_tar(e, np.zeros(60)) is None  # no impostor pair
    with pytest.raises(ToolchainError, match="identities"):
        cross_pair_tar(e, ids[:5])
