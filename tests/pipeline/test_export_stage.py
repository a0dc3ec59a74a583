"""The export stage's agreement target for the int8 fallback (toolchain.quantize.agreement)."""

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

import toolchain.pipeline.stages as stages
from toolchain.models.registry import ModelSpec
from toolchain.recipe import validate_recipe


class _Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 8, 3, 2, 1), nn.Flatten(1), nn.LazyLinear(16))
        self.spec = ModelSpec(name="tiny", output="embedding", output_dim=16)

    def forward(self, x):
        return self.body(x)


def test_the_agreement_target_comes_from_the_parity_bound_and_the_pair_count(monkeypatch):
    torch.manual_seed(0)
    model = _Embedder()
    model(torch.zeros(1, 3, 112, 112))  # the lazy layer takes its shape
    monkeypatch.setattr(stages, "_float_model", lambda ctx: model.eval())
    monkeypatch.setattr(stages, "_pairs", lambda ctx, max_pairs: range(1200))
    recipe = validate_recipe({"name": "m", "kind": "embedding", "export": {"model": "mobilefacenet"},
                              "parity": {"min_decision_agreement": 99.5}})
    ctx = SimpleNamespace(recipe=recipe)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 112, 112, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 4)
    got = stages._agreement_target(ctx, images, labels)
    aim = got["agreement"]
    assert aim["parity_pairs"] == 1200 and aim["allowed_flips"] == 6 and aim["expected_flips"] < 6
    assert got["max_score_noise"] == aim["max_score_noise"] > 0
    assert got["score_threshold"] == aim["score_threshold"]
    # Identity data without labels (a RecordIO set can lack them): no agreement target.
    assert stages._agreement_target(ctx, images, np.full(40, -1)) == {}
