"""End to end for a zoo backbone (MobileFaceNet, random init: the export is what is tested):
both formats, int8 and fp32, one shared export. The int8 files run PReLU in int8."""

import numpy as np
import pytest
import torch

from toolchain.export import export_model, read_embedded_metadata
from toolchain.export.bench import recalibrate_batchnorm
from toolchain.runtime.manifest import MANIFEST_NAME, read_manifest, sha256_file
from toolchain.models import build_model
from toolchain.runtime import load_runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("mfn")
    torch.manual_seed(0)
    model = build_model("mobilefacenet").eval()
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    # Random init: give BatchNorm data statistics, else the embedding vanishes below int8's resolution.
    recalibrate_batchnorm(model, rng.integers(0, 256, (32, 112, 112, 3), dtype=np.uint8))
    records = export_model(model, out, calibration_images=calib, progress=False)
    return {"out": out, "model": model, "records": {(r.format, r.precision): r for r in records},
            "images": rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)}


def test_manifest_and_reference(exported):
    man = read_manifest(exported["out"])
    assert {a["file"] for a in man["artifacts"]} == {f"mobilefacenet_{p}{e}" for p in ("int8", "fp32")
                                                     for e in (".pte", ".tflite")}
    assert man["source"]["kind"] == "module" and man["reference"] == "float_model.pt"
    for a in man["artifacts"]:
        assert a["sha256"] == sha256_file(exported["out"] / a["file"])
    # The stored float reference reproduces the model.
    ref = load_runner(exported["out"] / "float_model.pt").run(exported["images"])
    assert np.allclose(ref, load_runner(exported["model"]).run(exported["images"]), atol=1e-5)


def test_prelu_runs_in_int8(exported):
    """No PReLU left in float in either int8 file: XNNPACK's int8 PReLU in the .pte
    (toolchain.quantize.pt2e), the two-op form of toolchain.export.int8_prelu in the .tflite."""
    rec = exported["records"]
    d8 = rec[("executorch", "int8")].checks["delegation"]
    assert d8["float_ops"] == {} and d8["partitions"] == 1 and not d8["ops_outside"], d8
    t8 = rec[("tflite", "int8")].checks["tflite"]
    assert t8["is_int8"], t8["problems"]
    assert not t8["xnnpack_unsupported"], t8["xnnpack_unsupported"]
    # The fp32 files keep the plain PReLU.
    assert rec[("executorch", "fp32")].checks["delegation"]["partitions"] >= 1


def test_outputs_close_to_eager(exported):
    images = exported["images"]
    ref = load_runner(exported["model"]).run(images)
    assert ref.shape == (3, 512)
    for (fmt, prec), r in exported["records"].items():
        y = load_runner(r.path).run(images)
        assert y.shape == ref.shape
        cos = np.sum(y * ref, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
        if prec == "fp32":
            assert np.abs(y - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()), (fmt, prec)
        else:
            assert cos.min() > 0.9, (fmt, prec, cos)
        meta = read_embedded_metadata(r.path)
        assert meta["output"] == "embedding" and meta["output_dim"] == 512 and meta["threshold"] is None
