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
