"""Bad input fails with one clear message and leaves no artifact behind; unsupported ops are
reported, not exported under a misleading name."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.cli import main
from toolchain.errors import CheckFailed, ToolchainError
from toolchain.export import export_model
from toolchain.models import build_model
from toolchain.models.registry import ModelSpec

ARTIFACT_SUFFIXES = {".pte", ".tflite", ".json", ".pt", ".onnx", ".tmp"}


def _calib(n=4, hw=(112, 112)):
    return np.random.default_rng(0).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def _no_artifacts(out):
    if not out.exists():
        return True
    left = [p for p in out.rglob("*")]
    return not left


class TinyPReLU(nn.Module):
    """A small embedding model with a PReLU of one shared slope, which the .tflite's int8 rewrite
    (toolchain.export.int8_prelu, per-channel slopes only) leaves alone: LiteRT's XNNPACK then
    refuses its int8 PRELU, and the test below checks that the export says so."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 4, 1)
        self.act = nn.PReLU()  # one shared slope: not rewritten
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.spec = ModelSpec(name="tiny-prelu", output="embedding", output_dim=4)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


class TinyAbs(nn.Module):
    """A small embedding model with an op XNNPACK's int8 path keeps in float (abs: the quantizer
    does not annotate it, the delegate runs it in fp32); these tests check that the reports say so."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.spec = ModelSpec(name="tiny-abs", output="embedding", output_dim=4)

    def forward(self, x):
        return self.fc(self.pool(torch.abs(self.conv(x))).flatten(1))


class WrongSize(nn.Module):
    """Declares 112x112 but its linear layer only fits a 32x32 input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 4)
        self.spec = ModelSpec(name="wrong-size", output="embedding", output_dim=4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_int8_without_calibration_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ToolchainError, match="calibration"):
        export_model(build_model("verifier"), out, threshold=0.0, calibration_images=None, progress=False)
    assert _no_artifacts(out)


def test_wrong_calibration_size_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ToolchainError, match="wrong input size 100x100"):
        export_model(build_model("verifier"), out, threshold=0.0, calibration_images=_calib(hw=(100, 100)),
                     progress=False)
    assert _no_artifacts(out)


def test_model_that_does_not_take_its_input_size(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ToolchainError, match="does not run on its declared input"):
        export_model(WrongSize(), out, precisions="fp32", progress=False)
    assert _no_artifacts(out)


def test_cli_bad_inputs_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "verifier", "--out", str(out), "--threshold", "0",
                 "--calibration", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy" in capsys.readouterr().err
    assert main(["export", "verifier", "--out", str(out), "--formats", "onnx"]) == 2
    assert main(["export", "no-such-model", "--out", str(out)]) == 2
    assert main(["export", "verifier", "--out", str(out), "--precisions", "fp32"]) == 2  # verifier: no threshold
    assert _no_artifacts(out)


def test_litert_torch_backend_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if it were not installed
    out = tmp_path / "out"
    with pytest.raises(ToolchainError, match="litert-torch is not installed"):
        export_model(TinyPReLU(), out, formats="tflite", precisions="fp32", tflite_backend="litert-torch",
                     progress=False)
    assert _no_artifacts(out)


@pytest.mark.slow
def test_float_island_fails_full_delegation_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    torch.manual_seed(0)
    with pytest.raises(CheckFailed, match="abs x1"):
        export_model(TinyAbs(), out, formats="executorch", precisions="int8", calibration_images=_calib(),
                     require_full_delegation=True, progress=False)
    assert _no_artifacts(out)


@pytest.mark.slow
def test_float_island_report_when_partial_delegation_allowed(tmp_path):
    out = tmp_path / "out"
    torch.manual_seed(0)
    recs = export_model(TinyAbs(), out, formats="executorch", precisions="int8", calibration_images=_calib(),
                        progress=False)
    d = recs[0].checks["delegation"]
    # XNNPACK runs the float abs inside its partition; the report names it as a float island.
    assert d["float_ops"] == {"abs": 1} and d["partitions"] == 1, d
    assert not d["float_prefix_ops"], d


def test_shared_slope_prelu_is_int8_in_the_pte(tmp_path):
    """XNNPACK's int8 PReLU takes one shared slope as well as per-channel ones."""
    torch.manual_seed(0)
    recs = export_model(TinyPReLU(), tmp_path / "out", formats="executorch", precisions="int8",
                        calibration_images=_calib(), require_full_delegation=True, progress=False)
    d = recs[0].checks["delegation"]
    assert d["float_ops"] == {} and d["partitions"] == 1 and not d["ops_outside"], d


@pytest.mark.slow
def test_int8_tflite_with_prelu_is_flagged(tmp_path):
    out = tmp_path / "out"
    torch.manual_seed(0)
    with pytest.raises(CheckFailed, match="PRELU"):
        export_model(TinyPReLU(), out, formats="tflite", precisions="int8", calibration_images=_calib(),
                     require_full_delegation=True, progress=False)
    assert _no_artifacts(out)
