"""The export stage's agreement target for the int8 fallback (toolchain.evaluate.flips)."""

from types import SimpleNamespace

import numpy as np

import toolchain.evaluate.parity as parity
import toolchain.pipeline.stages as stages
import toolchain.runtime as runtime
from toolchain.evaluate.flips import agreement_target
from toolchain.recipe import validate_recipe


def test_the_agreement_target_is_read_from_the_float_scores_of_the_parity_pairs(monkeypatch):
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 600)
    scores = np.where(issame, rng.normal(0.7, 0.1, 1200), rng.normal(0.3, 0.1, 1200))
    pairs = SimpleNamespace(issame=issame)
    runner = object()
    monkeypatch.setattr(stages, "_pairs", lambda ctx, max_pairs: pairs)
    monkeypatch.setattr(stages, "_embedding_source", lambda ctx: "backbone.pt")
    monkeypatch.setattr(runtime, "load_runner", lambda source: runner if source == "backbone.pt" else None)
    monkeypatch.setattr(parity, "pair_scores", lambda r, p: (scores, None, None) if (r, p) == (runner, pairs) else None)
    recipe = validate_recipe({"name": "m", "kind": "embedding", "export": {"model": "mobilefacenet"},
                              "parity": {"min_decision_agreement": 99.5}})
    got = stages._agreement_target(SimpleNamespace(recipe=recipe))
    expected = agreement_target(scores, issame, 99.5)
    assert got["agreement"] == expected and got["agreement"]["allowed_flips"] == 6
    assert got["max_score_noise"] == expected["max_score_noise"] > 0
    assert got["score_threshold"] == expected["score_threshold"]
