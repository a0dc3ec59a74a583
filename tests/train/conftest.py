"""Fixtures for the training tests: a tiny embedding model and a tiny identity data set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.models import registry

TINY = "tiny-test-embedder"


class TinyEmbedder(nn.Module):
    """A few-thousand-parameter stand-in for a zoo backbone (112x112 in, embedding out)."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.AvgPool2d(4), nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, embedding_size),
        )

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def tiny_model():
    """Registers TINY for one test module (and removes it, so zoo-wide tests never see it)."""
    if TINY not in registry._REGISTRY:
        registry.register_model(TINY, output="embedding", output_dim=16)(lambda embedding_size=16: TinyEmbedder(embedding_size))
    yield TINY
    registry._REGISTRY.pop(TINY, None)


class ToyIdentities(torch.utils.data.Dataset):
    """Identities are smooth random colour patterns; images add noise. Items are
    (normalised float 3x112x112, int label) like the real identity data sets."""

    def __init__(self, num_classes: int = 12, per_class: int = 6, seed: int = 0, noise: float = 0.35) -> None:
        rng = np.random.default_rng(seed)
        protos = rng.uniform(-1, 1, size=(num_classes, 3, 7, 7)).astype(np.float32)
        protos = torch.nn.functional.interpolate(torch.from_numpy(protos), size=(112, 112), mode="bilinear")
        self.labels = np.repeat(np.arange(num_classes), per_class)
        noise_t = torch.from_numpy(rng.normal(0, noise, size=(len(self.labels), 3, 112, 112)).astype(np.float32))
        # Quantise through uint8, as real images are.
        x = (protos[torch.as_tensor(self.labels)] * 0.8 + noise_t).clamp(-1, 1)
        self.images = ((x * 0.5 + 0.5) * 255).round() / 255 * 2 - 1
        self.num_classes = num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.fixture(scope="module")
def toy_data():
    return ToyIdentities()


@pytest.fixture
def make_toy():
    return ToyIdentities
