import json

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.data.pairs import VerificationPairs
from toolchain.errors import CheckFailed, ToolchainError
from toolchain.evaluate.parity import (ParityBounds, ProbeSet, _lowest_images, check_parity, load_eval_set,
                                       load_probe_set, run_parity, write_probe_set)
from toolchain.models.registry import ModelSpec


def _imgs(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


class TinyEmbedder(nn.Module):
    """A small backbone stand-in (ReLU only, fully int8-capable), 16-d embedding."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 16))
        self.spec = ModelSpec(name="tiny-embedder", output="embedding", output_dim=16)

    def forward(self, x):
        return self.body(x)


def test_probe_set_round_trip(tmp_path):
    imgs, same = _imgs(4), np.array([1, 0, 1, 0], bool)
    path = write_probe_set(tmp_path / "p.npz", imgs, same, user="alice")
    probe = load_probe_set(path)
    assert np.array_equal(probe.images, imgs) and np.array_equal(probe.issame, same)
    assert isinstance(load_eval_set(path), ProbeSet)
    with pytest.raises(ToolchainError, match="labels"):
        write_probe_set(tmp_path / "q.npz", imgs, same[:3])
    with pytest.raises(ToolchainError, match=".npz"):
        write_probe_set(tmp_path / "q.bin", imgs, same)
    np.savez(tmp_path / "bad.npz", pictures=imgs)
    with pytest.raises(ToolchainError, match="'images' and 'issame'"):
        load_probe_set(tmp_path / "bad.npz")


def test_bounds_from_recipe_dict():
    b = ParityBounds.from_any({"max_accuracy_drop": 0.5, "min_decision_agreement": 98})
    assert b.max_accuracy_drop == 0.5 and b.min_agreement == 98
    assert ParityBounds.from_any(None) == ParityBounds(0.3, 99.5)
    b = ParityBounds.from_any({"max_tar_drop": 1, "min_embedding_cosine_mean": 0.999,
                               "min_embedding_cosine_min": None})
    assert (b.max_tar_drop, b.min_cosine_mean, b.min_cosine_min) == (1.0, 0.999, None)
    assert b.to_dict() == {"max_accuracy_drop": 0.3, "min_agreement": 99.5, "max_tar_drop": 1.0,
                           "min_cosine_mean": 0.999}


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    from toolchain.export import export_model

    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = TinyEmbedder().eval()
    recs = export_model(model, out, formats="executorch", precisions=("int8", "fp32"), calibration_images=_imgs(8),
                        progress=False)
    rng = np.random.default_rng(3)
    n = 40
    a = _imgs(n, 1)
    b = a.copy()
    same = np.arange(n) % 2 == 0
    # matched pairs: the same image with mild noise; mismatched: another random image
    noise = rng.integers(-8, 9, b[same].shape)
    b[same] = np.clip(b[same].astype(int) + noise, 0, 255).astype(np.uint8)
    b[~same] = _imgs(int((~same).sum()), 2)
    return model, {r.precision: r.path for r in recs}, VerificationPairs(a, b, same, name="tiny")


@pytest.mark.slow
def test_backbone_parity_rows(tiny_exports):
    model, paths, pairs = tiny_exports
    rows = run_parity([paths["fp32"], paths["int8"]], pairs, reference=model, bounds=ParityBounds(100, 0),
                      repeats=3)
    fp, i8 = rows
    assert fp["kind"] == "backbone" and fp["runtime"] == "executorch"
    assert fp["decision_agreement"] == 100.0 and fp["accuracy_drop"] == pytest.approx(0, abs=1e-9)
    assert fp["embedding_cosine_min"] > 0.9999 and fp["max_abs_gap"] < 1e-4
    assert i8["embedding_cosine_mean"] > 0.95 and i8["max_abs_gap"] >= i8["mean_abs_gap"]
    diff = np.array(i8["scores"]) - np.array(i8["float_scores"])
    assert i8["score_shift"] == pytest.approx(diff.mean()) and i8["score_noise"] == pytest.approx(diff.std())
    assert i8["score_noise"] > 0 and abs(fp["score_shift"]) < 1e-4
    flipped = (np.array(i8["scores"]) > i8["threshold"]) != (np.array(i8["float_scores"]) > i8["threshold"])
    assert i8["flips"] == int(flipped.sum()) and fp["flips"] == 0
    assert i8["allowed_flips"] == 40  # ParityBounds(100, 0): every decision may flip
    assert i8["expected_flips"] > 0 and fp["expected_flips"] < 1e-6
    assert i8["noise_budget"] > 0
    # the artifact's accuracy is at the float model's fold thresholds: only flipped decisions move it
    from toolchain.evaluate.metrics import fold_indices, verification_metrics

    y, a, f = np.array(i8["issame"]), np.array(i8["scores"]), np.array(i8["float_scores"])
    folds, _ = fold_indices(y)
    fold_thresholds = verification_metrics(f, y)["fold_thresholds"]
    moved = sum(int(np.sum((a[k] > t) != (f[k] > t))) for k, t in zip(folds, fold_thresholds))
    assert abs(i8["accuracy_drop"]) <= 100 * moved / len(y) + 1e-9
    assert i8["refit_accuracy"] == pytest.approx(verification_metrics(a, y)["accuracy"] * 100)
    for r in rows:
        assert len(r["scores"]) == len(r["float_scores"]) == len(r["issame"]) == 40
        assert r["latency_ms"] > 0 and r["float_latency_ms"] > 0 and r["passed"]
        assert set(r["tar_at_far"]) == {"1e-3", "1e-4"}


@pytest.mark.slow
def test_failed_bound_raises(tiny_exports):
    model, paths, pairs = tiny_exports
    rows = run_parity([paths["int8"]], pairs, reference=model, bounds={"max_accuracy_drop": -1}, repeats=2)
    assert not rows[0]["passed"] and "accuracy drop" in rows[0]["reason"]
    with pytest.raises(CheckFailed, match="parity failed"):
        check_parity(rows)


def test_distinct_images_of_pairs():
    a, b = _imgs(3, 1), _imgs(3, 2)
    pairs = VerificationPairs(np.stack([a[0], a[1], a[0]]), np.stack([b[0], a[0], b[2]]), [True, False, True])
    images, ia, ib = pairs.distinct()
    assert len(images) == 4  # a0, b0, a1, b2: a0 appears three times
    assert np.array_equal(images[ia], pairs.images_a) and np.array_equal(images[ib], pairs.images_b)


def test_lowest_images_name_their_first_pair_and_person():
    a, b = _imgs(3, 1), _imgs(3, 2)
    # a0 is pair 0's a and pair 2's a; b0 is pair 0's b and pair 1's a; a1 first appears as pair 1's b.
    pairs = VerificationPairs(np.stack([a[0], b[0], a[0]]), np.stack([b[0], a[1], b[2]]), [True, False, True],
                              identities=(np.array([7, 7, 7]), np.array([7, 8, 7])))
    images, ia, ib = pairs.distinct()  # a0, b0, a1, b2
    cos = np.array([0.95, 0.999, 0.9, 0.99])
    lowest = _lowest_images(cos, pairs, (ia, ib))
    assert [x["cosine"] for x in lowest] == [0.9, 0.95, 0.99, 0.999]
    assert [(x["pair"], x["side"], x["person"]) for x in lowest] == [(1, "b", 8), (0, "a", 7), (2, "b", 7), (0, "b", 7)]
    unnamed = VerificationPairs(pairs.images_a, pairs.images_b, pairs.issame)
    assert [x["person"] for x in _lowest_images(cos, unnamed, (ia, ib))] == [None] * 4


@pytest.mark.slow
def test_cosine_and_tar_bounds(tiny_exports):
    model, paths, pairs = tiny_exports
    # 40 listed pairs hold 20 mismatched ones: FAR <= 1e-3 is no false accept, so the TAR bound is refused.
    few = run_parity([paths["int8"]], pairs, reference=model, repeats=1,
                     bounds=ParityBounds(100, 0, max_tar_drop=100))[0]
    assert not few["passed"] and "needs at least 1,000 impostor pairs; this set has 20" in few["reason"]
    assert few["tar_pairs"] == {"of": "the listed pairs", "genuine": 20, "impostor": 20}
    # With each side's person known, TAR is read over every pair of the 80 distinct images.
    n = len(pairs)
    people = VerificationPairs(pairs.images_a, pairs.images_b, pairs.issame, "people",
                               (np.arange(n), np.where(pairs.issame, np.arange(n), n + np.arange(n))))
    loose = run_parity([paths["int8"]], people, reference=model, repeats=1,
                       bounds=ParityBounds(100, 0, max_tar_drop=100, min_cosine_mean=-1, min_cosine_min=-1))[0]
    assert loose["passed"] and loose["tar_drop"] is not None and loose["bounds"]["max_tar_drop"] == 100
    assert loose["tar_pairs"] == {"of": "every pair of the 80 distinct images", "genuine": 20,
                                  "impostor": 80 * 79 // 2 - 20}
    assert loose["far_resolution"] == pytest.approx(1 / loose["tar_pairs"]["impostor"])
    assert loose["listed_tar_drop"] is not None
    # The images furthest from float, lowest first, with where each first appears and its person.
    lowest = loose["embedding_cosine_lowest"]
    assert len(lowest) == 5 and lowest[0]["cosine"] == pytest.approx(loose["embedding_cosine_min"])
    assert [x["cosine"] for x in lowest] == sorted(x["cosine"] for x in lowest)
    for x in lowest:
        side = pairs.images_a if x["side"] == "a" else pairs.images_b
        assert x["person"] == people.identities[0 if x["side"] == "a" else 1][x["pair"]]
        assert x["pair"] == min(k for k in range(n) if np.array_equal(pairs.images_a[k], side[x["pair"]])
                                or np.array_equal(pairs.images_b[k], side[x["pair"]]))
    # Bounds just above what the int8 file measures fail, each naming itself.
    strict = ParityBounds(100, 0, max_tar_drop=loose["tar_drop"] - 0.01,
                          min_cosine_mean=loose["embedding_cosine_mean"] + 1e-6,
                          min_cosine_min=loose["embedding_cosine_min"] + 1e-6)
    row = run_parity([paths["int8"]], people, reference=model, bounds=strict, repeats=1)[0]
    assert not row["passed"]
    for text in ("TAR@FAR=1e-3 drop", "embedding cosine mean", "embedding cosine min"):
        assert text in row["reason"]
    first = lowest[0]
    assert f"(pair {first['pair']} {first['side']}, person {first['person']})" in row["reason"]


@pytest.mark.slow
def test_wrong_kind_of_set_and_missing_reference(tiny_exports, tmp_path):
    model, paths, pairs = tiny_exports
    probe = ProbeSet(_imgs(4), np.array([1, 0, 1, 0], bool))
    with pytest.raises(ToolchainError, match="verification pairs"):
        run_parity([paths["fp32"]], probe, reference=model, repeats=1)
    # A custom module has no reloadable float reference: the manifest records none.
    with pytest.raises(ToolchainError, match="--reference"):
        run_parity([paths["fp32"]], pairs, repeats=1)


@pytest.mark.slow
def test_parity_cli_shows_flips_and_noise_budget(tiny_exports, tmp_path, capsys):
    from toolchain.cli import main
    from toolchain.data.codec import encode_jpeg
    from toolchain.data.insightface_bin import write_bin

    model, paths, pairs = tiny_exports
    jpegs = [encode_jpeg(im) for ab in zip(pairs.images_a, pairs.images_b) for im in ab]
    write_bin(tmp_path / "pairs.bin", jpegs, pairs.issame)
    # the fp32 file stands in for the float model (the tiny model has no checkpoint on disk)
    rc = main(["parity", str(paths["int8"]), "--pairs", str(tmp_path / "pairs.bin"), "--reference",
               str(paths["fp32"]), "--min-agreement", "0", "--max-accuracy-drop", "100", "--repeats", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # rich wraps the headers at spaces, so look for whole words
    assert all(word in out for word in ("flips", "expected", "allowed", "budget"))
    rc = main(["parity", str(paths["int8"]), "--pairs", str(tmp_path / "pairs.bin"), "--reference",
               str(paths["fp32"]), "--min-agreement", "0", "--max-accuracy-drop", "100", "--repeats", "2", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert rc == 0 and row["allowed_flips"] == 40 and row["noise_budget"] > 0
