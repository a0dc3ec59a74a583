"""`export.int8`: calibration methods reach the PT2E observers; bias correction lowers the int8
graph's mean error; bad settings fail with exit 2 naming the key."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.models import build_model
from toolchain.quantize.int8_options import Int8Options
from toolchain.quantize.pt2e import quantize_xnnpack_int8
from toolchain.runtime.preprocess import model_input


def _images(n=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _act_scales(converted) -> dict[str, float]:
    return {n.args[0].name: float(n.args[1]) for n in converted.graph.nodes
            if n.op == "call_function" and str(n.target).endswith("quantize_per_tensor.default")}


def _quantize(model, images, **options):
    return quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), images, model.spec.mean, model.spec.std,
                                 int8=Int8Options(**options))


def test_calibration_methods_choose_different_ranges():
    torch.manual_seed(0)
    model = build_model("verifier", width=4).eval()
    images = _images()
    minmax = _act_scales(_quantize(model, images, calibration="minmax"))
    mse = _act_scales(_quantize(model, images, calibration="mse"))
    clipped = _act_scales(_quantize(model, images, calibration="percentile", percentile=99.0))
    assert minmax.keys() == mse.keys() == clipped.keys()
    # min-max keeps every value in range: no other method has a wider step on any activation.
    assert all(clipped[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    assert all(mse[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    # ... and clipping 1% of the tails narrows at least one range.
    assert any(clipped[k] < minmax[k] * 0.99 for k in minmax)


def _conv_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 4)).eval()
    net.spec = build_model("verifier", width=4).spec
    return net


def _corrected_mean_errors(net) -> tuple[dict, float, float]:
    """(bias correction report, mean |mean output error| without and with it) on the 16 images
    it was measured on, under ranges that clip 5% of every activation's tail: clipping shifts
    every layer's mean, a systematic error."""
    images = _images(16)
    x = torch.from_numpy(model_input(images, net.spec.mean, net.spec.std))
    with torch.no_grad():
        ref = net(x)
    options = dict(calibration="percentile", percentile=95.0)
    plain = _quantize(net, images, **options)
    report: dict = {}
    corrected = quantize_xnnpack_int8(net, torch.zeros(1, 3, 112, 112), images, net.spec.mean, net.spec.std,
                                      report=report, int8=Int8Options(**options, bias_correction=True))
    with torch.no_grad():
        err_plain = torch.cat([plain(x[i:i + 1]) for i in range(len(x))]) - ref
        err_corr = torch.cat([corrected(x[i:i + 1]) for i in range(len(x))]) - ref
    return report["bias_correction"], float(err_plain.mean(0).abs().mean()), float(err_corr.mean(0).abs().mean())


def test_bias_correction_lowers_the_mean_error_and_leaves_the_float_model_alone():
    net = _conv_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report, err_plain, err_corr = _corrected_mean_errors(net)
    assert report["layers"] == 3 and report["mean_abs_shift"] > 0
    # The output's mean error shrinks to the output rounding.
    assert err_corr < 0.5 * err_plain
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_bias_correction_brings_every_corrected_layer_to_its_float_mean():
    # The definition of the layer-by-layer correction: each layer measured after the ones before
    # it were corrected. Later layers do not change an earlier one's output, so afterwards every
    # corrected layer's per-channel mean over the images equals the float model's.
    from toolchain.quantize.bias_correction import _biased_layers, _channel_means, correct_biases
    from toolchain.quantize.pt2e import calibration_batches

    net = _conv_net()
    images = _images(16)
    converted = _quantize(net, images, calibration="percentile", percentile=95.0)
    float_graph = torch.export.export(net, (torch.zeros(1, 3, 112, 112),), strict=False).module()
    batches = list(calibration_batches(images, net.spec.mean, net.spec.std, batch=1))
    layers = list(_biased_layers(converted))
    before = _channel_means(converted, layers, batches)
    report = correct_biases(converted, float_graph, batches)
    after = _channel_means(converted, layers, batches)
    target = _channel_means(float_graph, layers, batches)
    assert report["layers"] == len(layers) == 3
    assert max(np.abs(b - t).max() for b, t in zip(before, target)) > 1e-3  # clipping shifted them
    assert all(np.allclose(a, t, atol=1e-5) for a, t in zip(after, target))


def test_bias_correction_reaches_convolutions_whose_batchnorm_pt2e_folds():
    # MobileFaceNet-like: bias-free convolutions, each followed by a BatchNorm. PT2E folds the
    # BatchNorm into a conv bias; the float reference must compare that bias's layer too.
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 4)).eval()
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    net.spec = build_model("verifier", width=4).spec
    report, err_plain, err_corr = _corrected_mean_errors(net)
    assert report["layers"] == 3  # both convolutions and the linear layer
    assert err_corr < 0.5 * err_plain


@pytest.mark.parametrize("linear_bias", [True, False])
def test_bias_correction_of_an_embedding_head_linear_then_batchnorm(linear_bias):
    # The backbones' head: Linear -> BatchNorm1d, which PT2E folds into the linear. The float
    # reference must fold it too. Unfolded, a biased linear (VarGFaceNet) was "corrected" by the
    # BatchNorm's whole shift and a bias-free one (MobileFaceNet) was never corrected.
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                        nn.Linear(8, 6, bias=linear_bias), nn.BatchNorm1d(6)).eval()
    bn = net[5]
    bn.running_mean.uniform_(-2.0, 2.0)  # a shift far larger than int8's own mean error
    bn.running_var.uniform_(0.5, 2.0)
    bn.bias.data.uniform_(-0.5, 0.5)
    net.spec = build_model("verifier", width=4).spec
    report, err_plain, err_corr = _corrected_mean_errors(net)
    assert report["layers"] == 2  # the convolution and the head's linear layer
    # Less mean error than without correction (the wrong correction added the BatchNorm's shift,
    # hundreds of times more); what is left is mostly the output's own rounding.
    assert err_corr < 0.75 * err_plain


def test_bias_correction_skips_the_per_user_tensors():
    torch.manual_seed(0)
    model = build_model("verifier", width=4, film=True).eval()
    report: dict = {}
    quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), _images(), model.spec.mean, model.spec.std,
                          report=report, int8=Int8Options(bias_correction=True))
    assert report["bias_correction"]["skipped"] == ["features.12.bias", "head.0.bias", "head.2.bias"]
    assert report["bias_correction"]["layers"] >= 5


def test_bad_options_are_refused():
    with pytest.raises(ToolchainError, match="unknown int8 calibration method 'kl'"):
        Int8Options(calibration="kl")
    with pytest.raises(ToolchainError, match="percentile"):
        Int8Options(calibration="percentile", percentile=20)
    assert Int8Options.from_any({"calibration": "minmax"}).to_dict() == {"calibration": "minmax",
                                                                         "bias_correction": False}
    assert Int8Options().is_default and not Int8Options(bias_correction=True).is_default
    for bad in ({"qat_steps": -1}, {"qat_lr": 0.0}, {"qat_batch": 1}, {"max_float_layers": 0},
                {"fallback_unit": "stage"}, {"outlier_factor": 1.0}, {"agreement_risk": 0.0},
                {"agreement_risk": 1.0}):
        with pytest.raises(ToolchainError):
            Int8Options(**bad)
    # The fallback's risk is recorded with the method only where it is on and not the default.
    assert "agreement_risk" not in Int8Options(fallback=True).to_dict()
    assert "agreement_risk" not in Int8Options(agreement_risk=0.01).to_dict()
    assert Int8Options(fallback=True, agreement_risk=0.01).to_dict()["agreement_risk"] == 0.01
    tuned = Int8Options(qat_steps=5, float_layers=["a.b"])
    assert tuned.to_dict()["qat_steps"] == 5 and tuned.to_dict()["float_layers"] == ["a.b"]
    # onnx2tf's .tflite records no float layers: the converter quantises every layer.
    assert "float_layers" not in tuned.applied(pt2e=False) and tuned.applied(pt2e=True)["float_layers"] == ["a.b"]
    assert "float_layers" not in tuned.applied(pt2e=True, float_layers=False)  # litert-torch's .tflite


def test_a_format_overrides_the_keys_it_sets_and_inherits_the_rest():
    from toolchain.recipe import Int8Section

    section = Int8Section(equalize=True, qat_steps=200, fallback=True,
                          tflite={"qat_steps": 0, "bias_correction": True})
    pte, tfl = Int8Options.from_any(section, "executorch"), Int8Options.from_any(section, "tflite")
    assert pte == Int8Options(equalize=True, qat_steps=200, fallback=True)
    assert tfl == Int8Options(equalize=True, qat_steps=0, bias_correction=True, fallback=True)
    # The section's own values, for anything not made per format; a plain dict reads the same.
    assert Int8Options.from_any(section) == pte
    assert Int8Options.from_any(section.model_dump(), "tflite") == tfl
    with pytest.raises(ToolchainError, match="QAT"):
        Int8Options.from_any({"tflite": {"qat_steps": -1}}, "tflite")


@pytest.mark.parametrize("override,key", [("export.int8.calibration=kl", "export.int8.calibration"),
                                          ("export.int8.percentile=20", "export.int8.percentile"),
                                          ("export.int8.bias_correction=maybe", "export.int8.bias_correction"),
                                          ("export.int8.qat_step=3", "export.int8.qat_step"),
                                          ("export.int8.qat_steps=-1", "export.int8.qat_steps"),
                                          ("export.int8.qat_lr=0", "export.int8.qat_lr"),
                                          ("export.int8.qat_batch=1", "export.int8.qat_batch"),
                                          ("export.int8.max_float_layers=0", "export.int8.max_float_layers"),
                                          ("export.int8.fallback=sometimes", "export.int8.fallback"),
                                          ("export.int8.fallback_unit=stage", "export.int8.fallback_unit"),
                                          ("export.int8.outlier_factor=1", "export.int8.outlier_factor"),
                                          ("export.int8.agreement_risk=0", "export.int8.agreement_risk"),
                                          ("export.int8.agreement_risk=1.5", "export.int8.agreement_risk"),
                                          ("export.int8.tflite.qat_steps=-1", "export.int8.tflite.qat_steps"),
                                          ("export.int8.executorch.calibration=kl",
                                           "export.int8.executorch.calibration"),
                                          ("export.int8.tflite.fallback=true", "export.int8.tflite.fallback"),
                                          ("export.int8.full_range_layers=[features.99]",
                                           "export.int8.full_range_layers: features.99"),
                                          ("export.int8.float_layers=[stem,features.0]",
                                           "export.int8.float_layers: stem")])
def test_recipe_with_a_bad_int8_setting_exits_2(tmp_path, capsys, override, key):
    from pathlib import Path

    from toolchain.cli import main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "mobilefacenet.yaml"
    rc = main(["run", str(recipe), "--out", str(tmp_path / "out"), override])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
