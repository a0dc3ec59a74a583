"""`export.int8` reaches the exported files: each int8 artifact records the method it was made with."""

import json

import numpy as np
import torch

from toolchain.export import export_model
from toolchain.export.metadata import template_id
from toolchain.models import build_model
from toolchain.quantize.int8_options import Int8Options


def test_pte_records_calibration_and_bias_correction(tmp_path):
    torch.manual_seed(0)
    model = build_model("verifier", width=4).eval()
    calib = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    options = {"calibration": "percentile", "percentile": 99.9, "bias_correction": True}
    rec = export_model(model, tmp_path, "executorch", "int8", calib, threshold=0.0, model_kwargs={"width": 4},
                       progress=False, int8=options)[0]
    assert rec.checks["int8_method"] == {**options, "by": "PT2E (torchao)"}
    # The head is per-user: its biases keep their float values (the fleet path computes them).
    corrected = rec.checks["delegation"]["bias_correction"]
    assert corrected["skipped"] == ["head.0.bias", "head.2.bias"] and corrected["layers"] == 7  # the 7 trunk convolutions
    manifest = json.loads((tmp_path / "export_manifest.json").read_text())
    assert manifest["int8"] == options


def test_template_id_changes_only_for_a_non_default_int8_method():
    key = dict(hypernet_sha256="h" * 64, calibration_sha256="c" * 64, fmt="tflite", precision="int8",
               versions={"torch": "x"}, model_kwargs={})
    plain = template_id(**key)
    assert template_id(**key, int8=Int8Options()) == plain
    assert template_id(**key, int8=Int8Options(bias_correction=True)) != plain
    assert template_id(**{**key, "precision": "fp32"}, int8=Int8Options(bias_correction=True)) == \
        template_id(**{**key, "precision": "fp32"})


class _Embedder(torch.nn.Module):
    def __init__(self):
        from toolchain.models.registry import ModelSpec

        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1))
        self.emb = torch.nn.Linear(16, 32)
        self.spec = ModelSpec(name="tiny-embedder", output="embedding", output_dim=32)

    def forward(self, x):
        return self.emb(self.body(x))


def test_float_layers_make_a_mixed_pte_with_its_latency_cost(tmp_path):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (24, 112, 112, 3), dtype=np.uint8)
    rec = export_model(_Embedder().eval(), tmp_path, "executorch", "int8", images[:8], progress=False,
                       int8={"float_layers": ["emb"]})[0]
    # Not int8 end to end, so not named as if it were.
    assert rec.file == "tiny-embedder_int8_mixed.pte" and (tmp_path / rec.file).is_file()
    assert rec.checks["int8_method"]["float_layers"] == ["emb"]
    assert rec.checks["delegation"]["float_ops"] == {"linear": 1}  # the kept layer computes in float
    fallback = json.loads((tmp_path / "export_manifest.json").read_text())["int8_recovery"]["fallback"]
    lat = fallback["latency"]
    assert fallback["given"] and lat["with_float_layers"] > 0 and lat["all_int8"] > 0 and lat["ratio"] > 0
    # The all-int8 file measured for the comparison is not left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pte") == ["tiny-embedder_int8_mixed.pte"]


def test_qat_and_fallback_reach_the_manifest(tmp_path):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (24, 112, 112, 3), dtype=np.uint8)
    rec = export_model(_Embedder().eval(), tmp_path, "executorch", "int8", images[:8], progress=False,
                       identity_images=images, int8={"qat_steps": 2, "qat_batch": 4, "fallback": True},
                       fallback_targets={"min_cosine_mean": -1.0})[0]
    # All int8 already meets a target of -1: nothing kept in float, the plain name.
    assert rec.file == "tiny-embedder_int8.pte" and rec.checks["int8_method"]["qat_steps"] == 2
    recovery = json.loads((tmp_path / "export_manifest.json").read_text())["int8_recovery"]
    assert recovery["qat"]["steps"] == 2 and recovery["fallback"]["met"] and recovery["fallback"]["float_layers"] == []
    assert recovery["sensitivity"]["layers"]


def test_equalization_and_bias_correction_reach_both_int8_files_and_the_manifest(tmp_path):
    from toolchain.models.registry import ModelSpec

    class WithBatchNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False),
                                            torch.nn.BatchNorm2d(8), torch.nn.PReLU(8),
                                            torch.nn.Conv2d(8, 8, 3, 2, 1, groups=8), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1))
            self.spec = ModelSpec(name="bn-embedder", output="embedding", output_dim=8)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    recs = export_model(WithBatchNorm().eval(), tmp_path, ["executorch", "tflite"], "int8", images,
                        progress=False, int8={"equalize": True, "bias_correction": True})
    # The .pte and the .tflite alike, each corrected on its own int8 graph.
    assert all(r.checks["int8_method"]["equalize"] and r.checks["int8_method"]["bias_correction"] for r in recs)
    assert sorted(r.checks["int8_method"]["by"].split()[0] for r in recs) == ["PT2E", "TFLite"]
    manifest = json.loads((tmp_path / "export_manifest.json").read_text())
    assert manifest["int8"]["equalize"] and manifest["int8_recovery"]["equalize"]["pairs"] == 1


def test_each_format_gets_its_own_int8_options(tmp_path):
    """`export.int8.tflite`: QAT for the .pte, bias correction and no QAT for the .tflite; each file
    records its own method, and the manifest keeps the .tflite's recovery apart."""
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    recs = export_model(_Embedder().eval(), tmp_path, ["executorch", "tflite"], "int8", images[:8], progress=False,
                        identity_images=images,
                        int8={"qat_steps": 2, "qat_batch": 4, "tflite": {"qat_steps": 0, "bias_correction": True}})
    method = {r.format: r.checks["int8_method"] for r in recs}
    assert method["executorch"]["qat_steps"] == 2 and not method["executorch"]["bias_correction"]
    assert "qat_steps" not in method["tflite"] and method["tflite"]["bias_correction"]
    manifest = json.loads((tmp_path / "export_manifest.json").read_text())
    assert manifest["int8"]["qat_steps"] == 2 and manifest["int8_recovery"]["qat"]["steps"] == 2
    assert manifest["int8_recovery"]["tflite"] == {"int8": {"calibration": "mse", "bias_correction": True}}


def test_calibration_outliers_are_left_out_before_quantising(tmp_path):
    """`toolchain export --outlier-factor`: the image on which activations explode is left out,
    the manifest says which, and the calibration record counts the images used."""
    from toolchain.cli import main

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(100, 156, (12, 112, 112, 3), dtype=np.uint8)
    images[3] = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)  # full contrast
    np.save(tmp_path / "calib.npy", images)
    rc = main(["export", "verifier", "--out", str(tmp_path / "out"), "--formats", "executorch", "--precisions",
               "int8", "--calibration", str(tmp_path / "calib.npy"), "--threshold", "0", "--outlier-factor", "3"])
    assert rc == 0
    manifest = json.loads((tmp_path / "out" / "export_manifest.json").read_text())
    outliers = manifest["int8_recovery"]["calibration_outliers"]
    assert [d["image"] for d in outliers["left_out"]] == [3] and outliers["images"] == 12
    assert manifest["calibration"]["images"] == 11 and manifest["int8"]["outlier_factor"] == 3.0
    rc = main(["export", "verifier", "--out", str(tmp_path / "bad"), "--calibration", str(tmp_path / "calib.npy"),
               "--threshold", "0", "--outlier-factor", "1"])
    assert rc == 2 and not (tmp_path / "bad").exists()


def test_pte_fallback_predicts_its_size_from_the_all_int8_file(tmp_path):
    # An unreachable target: the fallback tries float layers (so it lowers the all-int8 file once
    # for their predicted size) and, meeting nothing, ships the file all int8.
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (24, 112, 112, 3), dtype=np.uint8)
    rec = export_model(_Embedder().eval(), tmp_path, "executorch", "int8", images[:8], progress=False,
                       identity_images=images, int8={"fallback": True, "max_float_layers": 2},
                       fallback_targets={"min_cosine_min": 1.1, "max_int8_bytes": 10_000_000})[0]
    fallback = json.loads((tmp_path / "export_manifest.json").read_text())["int8_recovery"]["fallback"]
    assert not fallback["met"] and rec.file == "tiny-embedder_int8.pte"
    size = fallback["size"]
    assert size["all_int8_bytes"] == (tmp_path / rec.file).stat().st_size  # the base is the all-int8 file
    assert size["max_bytes"] < 10_000_000 and size["predicted_bytes"] == size["all_int8_bytes"]


def test_the_agreement_target_reaches_both_fallbacks(tmp_path):
    """The recipe's agreement target (toolchain.evaluate.flips.agreement_target) goes to the .pte's and the
    .tflite's fallbacks: each judges the score noise at its threshold and reports it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)  # one colour an image, so that their embeddings differ
    images = np.clip(rng.integers(0, 256, (16, 1, 1, 3)) + rng.normal(0, 30, (16, 112, 112, 3)), 0, 255)
    images = images.astype(np.uint8)
    targets = {"min_cosine_mean": -1.0, "score_threshold": 0.5, "max_score_noise": 1.0}
    export_model(_Embedder().eval(), tmp_path, ["executorch", "tflite"], "int8", images[:8], progress=False,
                 identity_images=images, int8={"fallback": True}, fallback_targets=targets)
    recovery = json.loads((tmp_path / "export_manifest.json").read_text())["int8_recovery"]
    for fallback in (recovery["fallback"], recovery["tflite_fallback"]):
        assert fallback["met"] and fallback["targets"]["max_score_noise"] == 1.0
        assert fallback["targets"]["score_threshold"] == 0.5
        assert 0 <= fallback["trail"][0]["score_noise"] < 1.0
