"""SeesawFaceNet lowers to ExecuTorch/XNNPACK (fp32 and int8) and the .pte matches eager.

ExecuTorch 1.5.1's ChannelsLastTaggedReshapePass fails on a PReLU with a 2-D input, which is what
the squeeze-excitation's PReLU (between its Linear layers) used to get; the model now runs it on
(N, C, 1, 1). One small net with every block form is exported in fp32 and int8; the registered
`seesawfacenet` itself in fp32 (its int8 export takes ~100 s on 2 cores: checked by hand).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.export import export_model
from toolchain.export.bench import recalibrate_batchnorm
from toolchain.models import build_model, get_spec
from toolchain.models.mobilefacenet import ConvBNAct
from toolchain.models.seesawfacenet import SeesawBlock, SqueezeExcite
from toolchain.runtime import load_runner


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _mixed_seesaw() -> nn.Module:
    """Every Seesaw block form in one small net: shuffle + residual, share + DW v1 conv mapping,
    shuffle + DW v2 pool mapping (exporting one net per variant costs ~20 s each)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNAct(3, 16, 3, 2, 1, act="silu"),
        SeesawBlock(16, 16, 32, residual=True, shuffle=True),
        SeesawBlock(16, 32, 64, stride=2, shuffle=False, mapping="conv"),
        SeesawBlock(32, 32, 64, stride=2, shuffle=True, mapping="pool"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )
    model.spec = replace(get_spec("seesawfacenet"), name="seesaw-blocks", output_dim=32)
    rng = np.random.default_rng(0)
    recalibrate_batchnorm(model, rng.integers(0, 256, (16, 112, 112, 3), dtype=np.uint8))
    return model.eval()


def test_se_prelu_on_4d_equals_the_2d_form():
    torch.manual_seed(0)
    se = SqueezeExcite(32).eval()
    with torch.no_grad():
        se.fc[2].weight.uniform_(-1, 1)  # per-channel slopes, so a channel mix-up would show
        x = torch.randn(2, 32, 7, 7)
        reference = x * se.fc(se.pool(x))[:, :, None, None]  # the plain (N, C) formulation
        assert torch.equal(se(x), reference)


@pytest.mark.slow
def test_seesaw_blocks_lower_fully_and_match_eager(tmp_path):
    model = _mixed_seesaw()
    rng = np.random.default_rng(1)
    calib = rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    records = export_model(model, tmp_path, formats="executorch", precisions="fp32,int8",
                           calibration_images=calib, progress=False)
    images = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    ref = load_runner(model).run(images)
    assert {r.precision for r in records} == {"fp32", "int8"}
    for r in records:
        d = r.checks["delegation"]
        assert d["partitions"] == 1 and d["ops_outside"] == {}, (r.precision, d)
        assert d.get("float_ops", {}) == {}, d  # SiLU, the SE's sigmoid and PReLU run in int8 too
        y = load_runner(r.path).run(images)
        assert y.shape == ref.shape == (3, 32)
        if r.precision == "fp32":
            assert np.abs(y - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
        else:
            assert _cosine(y, ref).min() > 0.95, _cosine(y, ref)


@pytest.mark.slow
def test_seesawfacenet_fp32_pte_matches_eager(tmp_path):
    torch.manual_seed(0)
    model = build_model("seesawfacenet").eval()
    records = export_model(model, tmp_path, formats="executorch", precisions="fp32", progress=False)
    d = records[0].checks["delegation"]
    assert d["fully_delegated"] and d["partitions"] == 1, d
    images = np.random.default_rng(2).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    ref = load_runner(model).run(images)
    y = load_runner(records[0].path).run(images)
    assert y.shape == ref.shape == (2, 512)
    assert np.abs(y - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
