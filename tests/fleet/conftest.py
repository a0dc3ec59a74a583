"""A tiny trained hypernetwork and a users folder for the fleet tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).parents[1] / "train" / "conftest.py")
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)
tiny_model = _train.tiny_model
toy_data = _train.toy_data


@pytest.fixture(scope="module")
def hypernet_ckpt(tiny_model, toy_data, tmp_path_factory):
    from toolchain.train import BackboneConfig, HypernetConfig, train_backbone, train_hypernet

    out = tmp_path_factory.mktemp("fleet-hn")
    bb = train_backbone(BackboneConfig(model=tiny_model, epochs=2, embedding_size=16, batch_size=12, optimizer="adamw",
                                       lr=0.01, warmup_steps=2, progress=False), toy_data, out / "bb")
    return train_hypernet(HypernetConfig(steps=30, identities_per_batch=6, probes_per_identity=2, val_identities=0.25,
                                         code_dim=16, encoder_hidden=32, progress=False), bb, toy_data, out / "hn")


def _uint8(toy, i) -> np.ndarray:
    x = toy.images[i].numpy().transpose(1, 2, 0)
    return np.round((x * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def users_dir(toy_data, tmp_path_factory):
    """7 users (two images each: the first enrolls) and a shared calibration set of 16 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fleet-users")
    for u in range(7):
        d = root / "users" / f"user{u:02d}"
        d.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(_uint8(toy_data, 6 * u + j)).save(d / f"{j}.png")
    np.save(root / "calib.npy", np.stack([_uint8(toy_data, i) for i in range(3, 72, 4)][:16]))
    return root
