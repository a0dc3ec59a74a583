"""`data.source: folder` end to end on a tiny image folder, with the redesign switched on (film
and cohort score normalisation): held-out identities, built pairs, the diagnosis, and the
per-user trunk tensors through enrollment and export into the runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from toolchain.cli import main
from toolchain.data import load_identity_dataset, load_pairs, write_synthetic
from toolchain.models.hypernet import load_hypernet
from toolchain.models.verifier import Verifier

TINY = Path(__file__).with_name("tiny.yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_synthetic(root / "faces", identities=30, images_per_identity=4, seed=0, fmt="folder")
    recipe = yaml.safe_load(TINY.read_text())
    recipe["name"] = "tiny-folder"
    recipe["data"] = {"source": "folder", "root": str(root / "faces" / "train"), "val_identities": 10,
                      "pairs": 40, "hard_negatives": 0.5}
    recipe["train"]["hypernet"].update({"verifier_kwargs": {"film": True}, "cohort_size": 16})
    recipe["export"].update({"formats": ["executorch", "tflite"], "precisions": ["fp32"]})
    path = root / "tiny-folder.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = root / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    return out


def test_held_out_identities_never_train(run_dir):
    held = json.loads((run_dir / "data/held_out.json").read_text())
    assert len(held["identities"]) == 10
    train = load_identity_dataset(run_dir / "data/train.rec")
    assert train.num_classes == 20
    pairs = load_pairs(run_dir / "pairs/pairs.bin")
    assert len(pairs) == 40 and pairs.issame.sum() == 20
    ids = json.loads((run_dir / "pairs/pair_identities.json").read_text())
    assert set(ids["a"]) | set(ids["b"]) <= set(held["labels"])
    # no pair image is a training image
    train_bytes = {train.get_uint8(i).tobytes() for i in range(len(train))}
    assert not any(img.tobytes() in train_bytes for img in pairs.images_a)


def test_evaluation_has_the_diagnosis(run_dir):
    ev = json.loads((run_dir / "manifest.json").read_text())["evaluation"]
    for route in ("trunk_cosine", "head_upper_bound"):
        assert 0 <= ev["diagnosis"][route]["accuracy"] <= 1 and ev["diagnosis"][route]["folds"] == "contiguous"
    assert set(ev["routes"]) == {"per_user", "symmetric", "backbone_cosine"}


def test_per_user_trunk_tensors_round_trip_through_enroll_and_export(run_dir):
    m = json.loads((run_dir / "manifest.json").read_text())
    user_dir = run_dir / m["users"][0]["dir"] if "users" in m else next((run_dir / "users").iterdir())
    state = torch.load(user_dir / "verifier.pt", weights_only=True)
    state = state.get("state_dict", state)
    bundle = load_hypernet(run_dir / "train/hypernet/hypernet.pt")
    base = bundle.hypernet.trunk.state_dict()
    # the film conv differs from the shared base (it is this user's), the other trunk layers do not
    assert not torch.equal(state["features.12.weight"], base["12.weight"])
    assert torch.equal(state["features.2.weight"], base["2.weight"])
    assert "features.12.weight" in Verifier(film=True).per_user_tensors()
    # each fp32 artifact, run in its runtime, gives the enrolled float verifier's logits
    rows = [p for p in m["parity"] if p["precision"] == "fp32"]
    assert {r["format"] for r in rows} == {"executorch", "tflite"}
    for r in rows:
        assert r["decision_agreement"] == 100.0 and r["max_abs_gap"] < 1e-3, r
