"""The export stage's agreement target for the int8 fallback (toolchain.evaluate.flips)."""

import json
from types import SimpleNamespace

import numpy as np
from rich.console import Console

import toolchain.evaluate.parity as parity
import toolchain.export as export
import toolchain.pipeline.stages as stages
import toolchain.quantize.calibration as calibration
import toolchain.runtime as runtime
from toolchain.evaluate.flips import agreement_target
from toolchain.pipeline.core import RunContext
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
    assert got == expected and got["allowed_flips"] == 6 and got["max_score_noise"] > 0
    # export.int8.agreement_risk: a lower risk aims at fewer expected flips, so a quieter file.
    strict = validate_recipe({"name": "m", "kind": "embedding", "export": {"model": "mobilefacenet", "int8": {
        "agreement_risk": 0.01}}, "parity": {"min_decision_agreement": 99.5}})
    tight = stages._agreement_target(SimpleNamespace(recipe=strict))
    assert tight == agreement_target(scores, issame, 99.5, risk=0.01) and tight["risk"] == 0.01
    assert tight["expected_flips"] < got["expected_flips"] and tight["max_score_noise"] < got["max_score_noise"]


def test_the_export_stage_hands_the_target_to_the_fallback_and_records_it(monkeypatch, tmp_path):
    aim = {"score_threshold": 0.786, "max_score_noise": 0.006, "pairs": 1200, "allowed_flips": 6,
           "expected_flips": 4.1, "risk": 0.05}
    images = np.zeros((4, 8, 8, 3), np.uint8)
    seen = {}

    def fake_export(source, out_dir, *args, fallback_targets=None, **kwargs):
        seen["targets"] = fallback_targets
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "export_manifest.json").write_text(json.dumps({"int8_recovery": {"fallback": {"met": True}}}))
        return []

    monkeypatch.setattr(export, "export_model", fake_export)
    monkeypatch.setattr(stages, "_agreement_target", lambda ctx: aim)
    monkeypatch.setattr(stages, "_embedding_source", lambda ctx: "backbone.pt")
    monkeypatch.setattr(stages, "_identity_dataset", lambda ctx: _Images(images))
    monkeypatch.setattr(calibration, "identity_calibration_set", lambda ds, n, seed: images)
    recipe = validate_recipe({"name": "m", "kind": "embedding",
                              "export": {"model": "mobilefacenet", "formats": ["executorch"],
                                         "int8": {"fallback": True}},
                              "parity": {"min_decision_agreement": 99.5}})
    out = stages._stage_export(RunContext(recipe, tmp_path, Console(quiet=True)))
    assert seen["targets"]["score_threshold"] == 0.786 and seen["targets"]["max_score_noise"] == 0.006
    assert "agreement" not in seen["targets"]  # the fallback gets the two numbers it aims at
    assert out.data["int8_recovery"]["agreement_target"] == aim


class _Images:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def get_uint8(self, i):
        return self.images[i]
