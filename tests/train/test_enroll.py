"""Enrollment: output loads into the `verifier` model, runs, and agrees with the hypernet; CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.cli import main
from toolchain.errors import ToolchainError
from toolchain.models.hypernet import load_hypernet
from toolchain.models.inputs import embed, nhwc_uint8_to_input
from toolchain.models.io import load_model
from toolchain.train import BackboneConfig, HypernetConfig, enroll_folder, enroll_images, train_backbone, train_hypernet
from toolchain.train.enroll import read_image

BB = dict(embedding_size=16, batch_size=12, optimizer="adamw", lr=0.01, arcface_scale=16.0, arcface_margin=0.2,
          warmup_steps=2, progress=False)


@pytest.fixture(scope="module")
def hypernet_ckpt(tiny_model, toy_data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("enroll")
    bb = train_backbone(BackboneConfig(model=tiny_model, epochs=2, **BB), toy_data, tmp_path / "bb")
    cfg = HypernetConfig(steps=15, identities_per_batch=6, val_identities=0.25, progress=False, code_dim=8,
                         encoder_hidden=16)
    return train_hypernet(cfg, bb, toy_data, tmp_path / "hn")


def _uint8(toy_data, idx):
    x = toy_data.images[idx]
    return ((x * 0.5 + 0.5) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_enrollment_loads_into_verifier_and_runs(hypernet_ckpt, toy_data, tmp_path):
    images = _uint8(toy_data, [0, 1])
    out = enroll_images(hypernet_ckpt, images, tmp_path / "alice", user="alice")
    model, meta = load_model(out)
    assert meta["model"] == "verifier" and meta["user"] == "alice" and meta["num_images"] == 2
    bundle = load_hypernet(hypernet_ckpt)
    assert meta["threshold"] == pytest.approx(bundle.threshold)
    probe = _uint8(toy_data, [2, 40])
    logits = model(nhwc_uint8_to_input(probe))
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    # Same numbers as the hypernet route with the averaged embedding.
    with torch.no_grad():
        e = embed(bundle.backbone, nhwc_uint8_to_input(images), flip=True)
        theta = bundle.hypernet(torch.nn.functional.normalize(e.mean(0, keepdim=True), dim=1))
        direct = bundle.hypernet.score_matrix(theta, bundle.hypernet.features(nhwc_uint8_to_input(probe)))[0]
    assert torch.allclose(logits[:, 0].detach(), direct, atol=1e-5)
    # Only the head differs between users; the trunk is the shared base.
    other, _ = load_model(enroll_images(hypernet_ckpt, _uint8(toy_data, [30]), tmp_path / "bob"))
    sa, sb = model.state_dict(), other.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("features."))
    assert not torch.equal(sa["head.0.weight"], sb["head.0.weight"])


def test_user_theta_same_floats_on_any_thread_count(hypernet_ckpt, toy_data):
    """Enrollment must give the same floats on every machine (fleet and serve files are compared
    byte for byte), and oneDNN's convolutions round differently with 1 and 2 threads."""
    from toolchain.train.enroll import user_theta

    bundle, image = load_hypernet(hypernet_ckpt), _uint8(toy_data, [3])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = user_theta(bundle, image)
        torch.set_num_threads(2)
        two = user_theta(bundle, image)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(one[k], two[k]) for k in one)
    # The fused embedder (BatchNorm folded, channels-last) is h_bb within float rounding.
    x = nhwc_uint8_to_input(image)
    with torch.no_grad():
        assert torch.allclose(embed(bundle.embedder, x), embed(bundle.backbone, x), atol=1e-5)


def test_enroll_bad_images(hypernet_ckpt, tmp_path):
    with pytest.raises(ToolchainError, match="aligned crops"):
        enroll_images(hypernet_ckpt, np.zeros((1, 64, 64, 3), np.uint8), tmp_path / "x")
    with pytest.raises(ToolchainError, match="uint8"):
        enroll_images(hypernet_ckpt, np.zeros((1, 112, 112, 3), np.float32), tmp_path / "x")
    with pytest.raises(ToolchainError, match="not a hypernet"):
        enroll_images(hypernet_ckpt.parent / "embeddings.pt", np.zeros((1, 112, 112, 3), np.uint8), tmp_path / "x")


def test_enroll_cli_single_and_batch(hypernet_ckpt, toy_data, tmp_path):
    users = tmp_path / "users"
    for name, idx in (("ann", [0, 1]), ("ben", [6])):
        (users / name).mkdir(parents=True)
        for k, img in enumerate(_uint8(toy_data, idx)):
            Image.fromarray(img).save(users / name / f"{k}.png")
    rc = main(["enroll", "--hypernet", str(hypernet_ckpt), "--image", str(users / "ann" / "0.png"),
               "--image", str(users / "ann" / "1.png"), "--out", str(tmp_path / "one")])
    assert rc == 0
    assert json.loads((tmp_path / "one" / "enrollment.json").read_text())["num_images"] == 2
    rc = main(["enroll", "--hypernet", str(hypernet_ckpt), "--users", str(users), "--out", str(tmp_path / "all")])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["ann", "ben"]
    assert load_model(tmp_path / "all" / "ben")[1]["user"] == "ben"
    assert enroll_folder(hypernet_ckpt, users, tmp_path / "api", progress=False)[0].name == "ann"
    # Bad input: exit 2 with a one-line reason.
    assert main(["enroll", "--hypernet", str(hypernet_ckpt), "--image", str(tmp_path / "missing.png"),
                 "--out", str(tmp_path / "z")]) == 2
    assert main(["enroll", "--hypernet", str(hypernet_ckpt), "--out", str(tmp_path / "z")]) == 2


def test_read_image_refuses_a_crop_of_another_size(tmp_path):
    Image.fromarray(np.full((100, 90, 3), 7, np.uint8)).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (100, 90, 3)
    assert read_image(tmp_path / "a.png", (100, 90)).shape == (100, 90, 3)
    with pytest.raises(ToolchainError, match="image is 90x100, expected an aligned 112x112 crop"):
        read_image(tmp_path / "a.png", (112, 112))
    with pytest.raises(ToolchainError, match="no such image"):
        read_image(tmp_path / "b.png")
