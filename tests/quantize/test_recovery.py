"""QAT and the accuracy-aware fallback on a tiny embedding model, in seconds."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.models.registry import ModelSpec
from toolchain.quantize.int8_options import Int8Options
from toolchain.quantize.pt2e import float_ops, quantize_xnnpack_int8
from toolchain.quantize.qat import qat_finetune
from toolchain.quantize.recovery import MEASURING_IMAGES, measuring_images, qat_images, recover_int8
from toolchain.quantize.selection import cosine_summary
from toolchain.quantize.sensitivity import _float_units, mirrored_embeddings, choose_float_layers, layer_sensitivity


class Embedder(nn.Module):
    """Three layers; the last one writes the embedding. The first layer's weights have a large
    outlier tap per channel, so per-channel int8 leaves its other taps few steps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.emb = nn.Linear(16, 32)
        self.spec = ModelSpec(name="tiny-embedder", output="embedding", output_dim=32)
        with torch.no_grad():
            self.stem[1].weight[:, :, 0, 0] *= 40.0  # outliers: one tap per channel

    def forward(self, x):
        return self.emb(self.pool(self.mid(self.stem(x))))


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _judged(graph, names, unit, images, ref) -> dict:
    """What the fallback's stopping rule sees with `names` float (toolchain.quantize.selection)."""
    with _float_units(graph, names, unit) as g:
        return cosine_summary(np.sum(mirrored_embeddings(g, images, 8, (0.5,) * 3, (0.5,) * 3) * ref, axis=1))


def _x(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Embedder().eval()
    with torch.no_grad():  # settle BatchNorm's statistics on the images
        m.train()(_x(_images(64, 9)))
    return m.eval()


def _cosine_to_float(m_int8, m_float, images):
    x = _x(images)
    with torch.no_grad():  # the converted graph was exported at batch 1
        a, b = torch.cat([m_int8(x[i:i + 1]) for i in range(len(x))]), m_float(x)
    return nn.functional.cosine_similarity(a, b, dim=1)


def test_qat_moves_the_weights_and_keeps_the_int8_gap_closed(model):
    images = _images(48)
    spec = model.spec
    tuned, report = qat_finetune(model, images, spec.mean, spec.std, steps=30, lr=1e-4, batch=8, progress=False)
    assert tuned is not model
    for p in model.parameters():  # the reference is untouched
        assert not p.grad_fn
    x = _x(_images(8, 3))
    with torch.no_grad():
        out, ref = tuned(x), model(x)
    assert not torch.equal(out, ref)  # the weights moved ...
    assert float(nn.functional.cosine_similarity(out, ref, dim=1).min()) > 0.99  # ... and stayed near float
    # Measured under fake quantisation, with the export's calibrated activation ranges, on a
    # fixed batch drawn like the training ones. This tiny model starts close to float; the gain
    # on a real one is in the README (MobileFaceNet).
    assert report["fake_quant_cosine_before"] > 0.9999
    assert report["fake_quant_cosine_after"] >= report["fake_quant_cosine_before"] - 2e-5
    assert report["steps"] == 30 and report["batch"] == 8


def test_qat_trains_the_folded_weights_on_batchnorm_running_statistics(model):
    """The int8 file folds BatchNorm's running statistics into the convolution: QAT trains that
    folded convolution (not batch statistics, prepare_qat_pt2e's default), leaving the model's
    statistics alone."""
    images = _images(16, 5)
    spec = model.spec
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    tuned, report = qat_finetune(model, images, spec.mean, spec.std, steps=2, lr=1e-9, batch=4, progress=False)
    assert report["batchnorm_folded"] == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in tuned.modules())
    for k, v in bn.items():
        assert torch.equal(model.state_dict()[k], v), k
    x = _x(_images(4, 6))
    with torch.no_grad():
        out, ref = tuned(x), model(x)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # Batch statistics of 4 random images would put the fake-quantised embedding far off float.
    assert report["fake_quant_cosine_before"] > 0.98


def test_qat_needs_steps_and_images(model):
    with pytest.raises(ToolchainError, match="at least one step"):
        qat_finetune(model, _images(4), model.spec.mean, model.spec.std, steps=0, progress=False)
    with pytest.raises(ToolchainError, match="identity images"):
        qat_finetune(model, _images(1), model.spec.mean, model.spec.std, steps=1, progress=False)


def test_sensitivity_ranks_layers_and_fallback_meets_its_target(model):
    images, calib = _images(32, 1), _images(16, 2)
    spec = model.spec
    sens = layer_sensitivity(model, calib, images, spec.mean, spec.std, None, batch=8, progress=False)
    names = [r["layer"] for r in sens["layers"]]
    assert sorted(names) == ["emb", "mid.0", "stem.1"]
    gains = [r["gain_mean"] for r in sens["layers"]]
    assert gains == sorted(gains, reverse=True) and gains[0] > 0
    base = sens["all_int8"]["cosine_mean"]
    assert base < 1.0
    # The target: the lower bound the top layer in float reaches, above all-int8's. It is met
    # with that layer; a target of 1.0 cannot be met.
    ref = mirrored_embeddings(model, images, 8, spec.mean, spec.std)
    target = _judged(sens["graph"], [names[0]], "layer", images, ref)["cosine_mean_low"]
    assert _judged(sens["graph"], [], "layer", images, ref)["cosine_mean_low"] < target
    got = choose_float_layers(model, sens, images, spec.mean, spec.std, min_cosine_mean=target,
                              min_cosine_min=None, max_layers=3, batch=8)
    assert got["met"] and got["float_layers"] == [names[0]]
    assert got["trail"][-1]["cosine_mean_low"] == pytest.approx(target, abs=1e-12)
    never = choose_float_layers(model, sens, images, spec.mean, spec.std, min_cosine_mean=1.0 + 1e-9,
                                min_cosine_min=None, max_layers=2, batch=8)
    # Unreachable: nothing is kept in float (it would cost latency and still miss), what was tried is listed.
    assert not never["met"] and never["float_layers"] == [] and 1 <= len(never["tried"]) <= 2
    assert len(never["trail"]) == len(never["tried"]) + 1
    # The graph the sensitivity edits is restored after each measurement.
    again = mirrored_embeddings(sens["graph"], images, 8, spec.mean, spec.std)
    assert cosine_summary(np.sum(again * ref, axis=1))["cosine_mean"] == pytest.approx(base, abs=1e-9)


def test_only_the_layers_the_proxy_picks_are_measured(model):
    images, calib = _images(16, 1), _images(8, 2)
    spec = model.spec
    sens = layer_sensitivity(model, calib, images, spec.mean, spec.std, None, batch=8, measure=1, progress=False)
    measured = [r for r in sens["layers"] if r["cosine_mean"] is not None]
    assert sens["measured"] == len(measured) == 1 and len(sens["layers"]) == 3
    # The measured one is the layer where int8 adds the most noise locally.
    assert measured[0]["local_error"] == max(r["local_error"] for r in sens["layers"]) > 0
    assert all(r["gain_mean"] is None for r in sens["layers"][1:])
    got = choose_float_layers(model, sens, images, spec.mean, spec.std, min_cosine_mean=1.1, min_cosine_min=None,
                              max_layers=3, batch=8)
    assert len(got["tried"]) <= 1  # unmeasured layers are never tried blind


def test_float_layers_stay_float_in_the_pt2e_graph(model):
    calib = _images(8)
    spec = model.spec
    report = {}
    quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), calib, spec.mean, spec.std, report=report,
                          int8=Int8Options(float_layers=("mid.0",)))
    assert report["float_layers"] == ["mid.0"] and report["float_ops"].get("conv2d") == 1, report
    plain = {}
    quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), calib, spec.mean, spec.std, report=plain)
    assert "conv2d" not in plain["float_ops"]


def test_qat_does_not_train_on_the_images_the_fallback_judges_it_on():
    index = np.arange(3 * MEASURING_IMAGES)
    images = np.zeros((len(index), 2, 2, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = index % 256, index // 256  # each image says which it is

    def which(x):
        return set(x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 0, 1].astype(int))

    measured, trained = measuring_images(images, 0), qat_images(images, 0)
    assert len(measured) == MEASURING_IMAGES and len(trained) == 2 * MEASURING_IMAGES
    assert not which(measured) & which(trained) and len(which(measured) | which(trained)) == len(index)
    assert not np.array_equal(measured, measuring_images(images, 1))  # the export seed draws them
    # Too few images to spare: QAT trains on all of them.
    assert len(qat_images(images[:MEASURING_IMAGES + 10], 0)) == MEASURING_IMAGES + 10


def test_recover_int8_reports_and_refuses_a_verifier(model):
    calib = _images(16)
    spec = model.spec
    out_model, options, report = recover_int8(model, model, calib, _images(32, 3), spec.mean, spec.std,
                                              Int8Options(fallback=True, max_float_layers=1),
                                              targets={"min_cosine_mean": -1.0, "min_cosine_min": 1.1},
                                              progress=False)
    assert out_model is model and options.float_layers == ()
    assert report["fallback"]["met"] is False and len(report["fallback"]["tried"]) == 1
    assert len(report["sensitivity"]["layers"]) == 3
    # A reachable target: the layer found is what the int8 files keep in float.
    _, options, report = recover_int8(model, model, calib, _images(32, 3), spec.mean, spec.std,
                                      Int8Options(fallback=True, max_float_layers=3),
                                      targets={"min_cosine_mean": report["fallback"]["trail"][1]["cosine_mean_low"]},
                                      progress=False)
    assert report["fallback"]["met"] and list(options.float_layers) == report["fallback"]["float_layers"]
    assert "graph" not in report["sensitivity"]
    with pytest.raises(ToolchainError, match="needs a target"):
        recover_int8(model, model, calib, None, spec.mean, spec.std, Int8Options(fallback=True), progress=False)
    with pytest.raises(ToolchainError, match="embedding models"):
        recover_int8(model, model, calib, None, spec.mean, spec.std, Int8Options(qat_steps=2), embedding=False)
    # Nothing asked: the model and options come back as they were.
    assert recover_int8(model, model, calib, None, spec.mean, spec.std, Int8Options())[2] == {}


def test_fast_reference_computes_what_the_converted_graph_computes(model):
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from toolchain.quantize.pt2e import xnnpack_quantizer
    from toolchain.quantize.sensitivity import fast_reference

    spec = model.spec
    x = _x(_images(8, 4))
    prepared = prepare_pt2e(torch.export.export(model, (x,), strict=False).module(), xnnpack_quantizer(Int8Options()))
    prepared(x)
    converted = convert_pt2e(prepared, fold_quantize=False)
    fast = fast_reference(copy.deepcopy(converted))
    names = {str(n.target) for n in fast.graph.nodes if n.op == "call_function"}
    assert not any("quantized_decomposed" in n for n in names)  # every q/dq pair rewritten
    with torch.no_grad():
        torch.testing.assert_close(fast(x), converted(x), rtol=0, atol=1e-5)
    assert spec.output == "embedding"


def test_the_fallbacks_reference_graph_is_bias_corrected_as_the_export_is(model):
    from toolchain.quantize.sensitivity import reference_int8_graph

    calib, probe, norm = _images(16, 5), _x(_images(8, 6)), ((0.5,) * 3, (0.5,) * 3)
    exported = quantize_xnnpack_int8(model, probe[:1], calib, *norm, int8=Int8Options(bias_correction=True))
    with torch.no_grad():
        written = torch.cat([exported(probe[i:i + 1]) for i in range(len(probe))])
        corrected = reference_int8_graph(model, calib, Int8Options(bias_correction=True), 8, *norm)(probe)
        plain = reference_int8_graph(model, calib, Int8Options(), 8, *norm)(probe)
    # The fallback judges the numbers the export writes, not the uncorrected graph's.
    torch.testing.assert_close(corrected, written, rtol=0, atol=1e-4)
    assert (plain - written).abs().max() > 1e-3


def test_qat_fake_quantises_prelu_as_the_pte_runs_it():
    """The .pte runs XNNPACK's int8 PReLU (toolchain.quantize.pt2e.annotate_prelu): QAT trains
    against the same rounding, slopes included, and freezes only the activation ranges."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from toolchain.quantize.int8_options import Int8Options
    from toolchain.quantize.qat import _is_weight, _qat_quantizer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.PReLU(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    graph = torch.export.export(net.eval(), (torch.zeros(2, 3, 32, 32),), strict=False).module()
    prepared = prepare_qat_pt2e(graph, _qat_quantizer(Int8Options()))
    prelu = next(n for n in prepared.graph.nodes if n.target == torch.ops.aten.prelu.default)
    slope_fq, out_fq = getattr(prepared, prelu.args[1].target), getattr(prepared, next(iter(prelu.users)).target)
    assert slope_fq.qscheme == torch.per_tensor_symmetric and _is_weight(slope_fq)
    assert "affine" in str(out_fq.qscheme) and not _is_weight(out_fq)  # an activation: its range freezes
    tuned, report = qat_finetune(_PReLUEmbedder().eval(), _images(16), (0.5,) * 3, (0.5,) * 3, steps=3, lr=1e-3,
                                 batch=4, progress=False)
    assert not torch.equal(tuned.act.weight, _PReLUEmbedder().act.weight)  # the slopes train too


class _PReLUEmbedder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.act = nn.Conv2d(3, 8, 3, 4, 1), nn.PReLU(8)
        self.pool, self.emb = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Linear(8, 16)

    def forward(self, x):
        return self.emb(self.pool(self.act(self.conv(x))))


class BlockEmbedder(nn.Module):
    """Two blocks of two convolutions each in a container, then the embedding layer."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.ReLU(), nn.Conv2d(c_out, c_out, 1), nn.ReLU())

        self.features = nn.Sequential(nn.Sequential(nn.AvgPool2d(4), block(3, 16)), block(16, 16))
        self.emb = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 32))
        self.spec = ModelSpec(name="tiny-blocks", output="embedding", output_dim=32)
        with torch.no_grad():
            self.features[0][1][0].weight[:, :, 0, 0] *= 40.0  # the same outlier taps as Embedder's

    def forward(self, x):
        return self.emb(self.features(x))


def test_block_fallback_ranks_whole_blocks_and_restores_the_graph():
    from toolchain.quantize.sensitivity import _float_blocks, block_names

    torch.manual_seed(0)
    model = BlockEmbedder().eval()
    spec = model.spec
    assert block_names(model) == ["features.0", "features.1", "emb.0", "emb.1", "emb.2"]
    images, calib = _images(24, 1), _images(16, 2)
    int8 = Int8Options(fallback=True, fallback_unit="block")
    sens = layer_sensitivity(model, calib, images, spec.mean, spec.std, int8, batch=8, progress=False)
    assert sens["unit"] == "block" and sens["measured"] == len(sens["layers"])
    assert {r["layer"] for r in sens["layers"]} >= {"features.0", "features.1"}
    assert all(r["op"] == "block" for r in sens["layers"])
    base = sens["all_int8"]["cosine_mean"]
    best = sens["layers"][0]
    assert best["gain_mean"] > 0
    ref = mirrored_embeddings(model, images, 8, spec.mean, spec.std)
    # Every block float leaves only the input's rounding: closer to float than any one block.
    with _float_blocks(sens["graph"], ["features.0", "features.1", "emb.2"]) as g:
        all_float = float(np.sum(mirrored_embeddings(g, images, 8, spec.mean, spec.std) * ref, axis=1).mean())
    assert all_float > best["cosine_mean"] > base
    again = mirrored_embeddings(sens["graph"], images, 8, spec.mean, spec.std)
    assert cosine_summary(np.sum(again * ref, axis=1))["cosine_mean"] == pytest.approx(base, abs=1e-9)
    judged = _judged(sens["graph"], [best["layer"]], "block", images, ref)
    got = choose_float_layers(model, sens, images, spec.mean, spec.std, max_layers=3, batch=8,
                              min_cosine_mean=judged["cosine_mean_low"], min_cosine_min=None)
    assert got["met"] and got["float_layers"] == [best["layer"]]
    # These 24 images are both the ranking and the judging set: the step's row is the table's row.
    assert got["trail"][1] == {"layers": 1, "added": best["layer"], **judged}
    assert judged["cosine_mean"] == pytest.approx(best["cosine_mean"], abs=1e-12)
    # The first step reuses the table's single-block measurements: only pairs are ranked again;
    # the judging passes are all int8 and each step's choice.
    import toolchain.quantize.sensitivity as sensitivity

    measured, float_units = [], sensitivity._float_units

    def counting(graph, names, unit):
        measured.append(list(names))
        return float_units(graph, names, unit)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sensitivity, "_float_units", counting)
        never = choose_float_layers(model, sens, images, spec.mean, spec.std, max_layers=2, batch=8,
                                    min_cosine_mean=1.0 + 1e-9, min_cosine_min=None)
    assert not never["met"] and measured[0] == [] and measured[1] == never["tried"][:1]
    ranked = measured[2:-1]
    assert len(ranked) == sens["measured"] - 1 and all(len(names) == 2 for names in ranked)
    assert measured[-1] == never["tried"] and len(never["tried"]) == 2
    # The file's graph: the block's two convolutions and ReLUs are left in float.
    report = {}
    quantize_xnnpack_int8(model, torch.zeros(1, 3, 112, 112), calib, spec.mean, spec.std, report=report,
                          int8=Int8Options(float_layers=("features.1",)))
    assert report["float_ops"].get("conv2d") == 2, report


def test_a_pte_size_budget_steers_the_block_fallback():
    from toolchain.quantize.recovery import FLOAT_WEIGHT_BYTES, float_weight_count

    torch.manual_seed(0)
    model = BlockEmbedder().eval()
    spec = model.spec
    images, calib = _images(24, 1), _images(16, 2)
    int8 = Int8Options(fallback=True, fallback_unit="block", max_float_layers=2)
    assert float_weight_count(model, ["features.1"]) == 16 * 16 * 9 + 16 * 16
    assert float_weight_count(model, ["emb"]) == 32 * 16 and float_weight_count(model, []) == 0

    def run(max_bytes):
        lowered = []
        _, options, report = recover_int8(model, model, calib, images, spec.mean, spec.std, int8,
                                          targets={"min_cosine_mean": 1.0 + 1e-9}, progress=False,
                                          pte_size=(max_bytes, lambda m, o: lowered.append(o) or 1000))
        return report["fallback"], lowered

    free, lowered = run(10 ** 9)
    assert len(lowered) == 1 and lowered[0].float_layers == ()  # one all-int8 lowering, whatever is tried
    assert free["size"]["all_int8_bytes"] == 1000 and len(free["tried"]) == 2
    # A budget the first free choice does not fit: the fallback tries only what fits.
    cost = FLOAT_WEIGHT_BYTES * float_weight_count(model, free["tried"][:1])
    tight, _ = run(1000 + cost - 1)
    assert free["tried"][0] not in tight["tried"]
    assert all(1000 + FLOAT_WEIGHT_BYTES * float_weight_count(model, tight["tried"][:k]) <= 1000 + cost - 1
               for k in range(1, len(tight["tried"]) + 1))
    # Refused a block and missed (this target cannot be met): a second pass by gain per byte ran,
    # on the predicted sizes, within the budget too. With room for everything there is none.
    assert tight["per_byte"]["met"] is False and "per_byte" not in free
    second = [t for t in tight["trail"] if t.get("pass") == "per byte"]
    assert [t["added"] for t in second] == tight["per_byte"]["tried"]
    assert all(1000 + FLOAT_WEIGHT_BYTES * float_weight_count(model, tight["per_byte"]["tried"][:k]) <= 1000 + cost - 1
               for k in range(1, len(second) + 1))


def test_the_block_fallback_keeps_blocks_until_the_agreement_target_holds_too():
    """Cosine targets already met all int8; the score noise at the threshold still decides."""
    torch.manual_seed(0)
    model = BlockEmbedder().eval()
    with torch.no_grad():
        model.emb[2].bias.zero_()
    spec = model.spec
    # Images of one colour each, so that their embeddings differ (pair scores 0.5 to 0.99).
    rng = np.random.default_rng(1)
    images = np.clip(rng.integers(0, 256, (24, 1, 1, 3)) + rng.normal(0, 30, (24, 112, 112, 3)), 0, 255)
    images, calib = images.astype(np.uint8), _images(16, 2)
    sens = layer_sensitivity(model, calib, images, spec.mean, spec.std,
                             Int8Options(fallback=True, fallback_unit="block"), batch=8, progress=False)

    def choose(max_noise):
        return choose_float_layers(model, sens, images, spec.mean, spec.std, max_layers=3, batch=8,
                                   min_cosine_mean=0.0, min_cosine_min=None,
                                   agreement={"score_threshold": 0.5, "max_score_noise": max_noise})

    loose = choose(1.0)
    assert loose["met"] and loose["float_layers"] == [] and len(loose["trail"]) == 1
    never = choose(1e-12)
    assert not never["met"] and len(never["tried"]) == 3
    noise = [t["score_noise"] for t in never["trail"]]
    assert noise[1] < noise[0]  # the first block chosen quietens the scores
    # Short of the agreement target alone, the quietest choice the steps judged stays float.
    quietest = int(np.argmin(noise))
    assert never["float_layers"] == never["tried"][:quietest] and never["closest"]
    got = choose(noise[1])
    assert got["met"] and got["float_layers"] == never["tried"][:1]
    assert got["trail"][1]["score_noise"] <= noise[1]
    without = choose_float_layers(model, sens, images, spec.mean, spec.std, max_layers=3, batch=8,
                                  min_cosine_mean=0.0, min_cosine_min=None)
    assert without["met"] and without["float_layers"] == [] and "score_noise" not in without["trail"][0]


@pytest.mark.parametrize("unit", ["block", "layer"])
def test_when_only_the_agreement_target_is_missed_the_quietest_unit_goes_first(unit):
    """The sensitivity table measures each unit's score noise at the threshold too, and the
    fallback takes units in that order while the cosine targets hold (selection.ranking_key)."""
    torch.manual_seed(0)
    model = BlockEmbedder().eval()
    spec = model.spec
    rng = np.random.default_rng(1)  # images of one colour each, as in the test above
    images = np.clip(rng.integers(0, 256, (24, 1, 1, 3)) + rng.normal(0, 30, (24, 112, 112, 3)), 0, 255)
    images, calib = images.astype(np.uint8), _images(16, 2)
    aim = {"score_threshold": 0.5, "max_score_noise": 1e-12}
    sens = layer_sensitivity(model, calib, images, spec.mean, spec.std,
                             Int8Options(fallback=True, fallback_unit=unit), batch=8, agreement=aim, progress=False)
    base = sens["all_int8"]["score_noise"]
    rows = [r for r in sens["layers"] if r["cosine_mean"] is not None]
    assert len(rows) >= 2 and base > 0
    for r in rows:
        assert r["gain_noise"] == pytest.approx(base - r["score_noise"], abs=1e-15)
    quietest = min(rows, key=lambda r: r["score_noise"])
    assert quietest["gain_noise"] > 0

    def first(min_cosine_mean):
        got = choose_float_layers(model, sens, images, spec.mean, spec.std, max_layers=1, batch=8,
                                  min_cosine_mean=min_cosine_mean, min_cosine_min=None, agreement=aim)
        assert not got["met"]
        # Short of the agreement target alone, the quieter choice stays float; else none does.
        assert got["float_layers"] == (got["tried"][:1] if min_cosine_mean == 0.0 else [])
        return got["tried"][0]

    # The cosine target holds all int8 (0.0): the unit that quietens the scores most comes first.
    assert first(0.0) == quietest["layer"]
    # A cosine target out of reach: the unit that wins back the most cosine comes first, as before.
    assert first(1.0 + 1e-9) == max(rows, key=lambda r: (r["cosine_mean"], r["cosine_min"]))["layer"]
