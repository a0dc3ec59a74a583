"""The int8 `.tflite`'s fallback: torch layers and blocks named in the converter's graph, float
units that leave a mixed file LiteRT runs, and the forward selection measured in LiteRT."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.export import export_model
from toolchain.export.tflite_check import inspect_tflite
from toolchain.export.tflite_fallback import (
    FloatPlan, choose_float_units, half_float_weights, litert_embeddings, op_units, quantize_keeping_float,
    unit_tensors,
)
from toolchain.models.registry import ModelSpec
from toolchain.runtime.preprocess import normalise


class _Blocks(nn.Module):
    """Two blocks (conv, ReLU, a depthwise conv with a residual add), then a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU()),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.emb = nn.Linear(8, 16)
        self.spec = ModelSpec(name="tiny-blocks", output="embedding", output_dim=16, input_size=(3, 32, 32))

    def forward(self, x):
        x = self.features[0](x)
        x = x + self.features[1](x)
        return self.emb(self.pool(x))


def _saved_model_calibrated(model, tmp_path, images):
    """The converter's calibrated float flatbuffer of `model`, as the export makes it."""
    import tensorflow as tf

    from toolchain.export import tflite as T

    example = torch.zeros(1, 3, 32, 32)
    T.export_onnx(model, example, tmp_path / "m.onnx")
    np.save(tmp_path / T._SAMPLE_NAME, np.zeros((20, 128, 128, 3), np.float32))
    import onnx2tf

    with T._in_dir(tmp_path), T._env_bin_on_path():
        onnx2tf.convert(input_onnx_file_path=str(tmp_path / "m.onnx"), output_folder_path=str(tmp_path / "out"),
                        non_verbose=True, output_signaturedefs=True)
    inputs = normalise(images, model.spec.mean, model.spec.std)

    def representative():
        for i in range(len(inputs)):
            yield [tf.constant(inputs[i:i + 1])]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "out"))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter._experimental_calibrate_only = True
    return converter.convert(), example, inputs


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)
    model = _Blocks().eval()
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    buf, example, inputs = _saved_model_calibrated(model, tmp_path_factory.mktemp("tfl"), images)
    return model, buf, example, inputs


def test_ops_are_named_by_the_torch_layers_and_blocks_they_compute(calibrated):
    model, buf, example, _ = calibrated
    layers = op_units(buf, model, example, None)
    assert list(layers) == ["features.0.0", "features.1.0", "emb"] and all(len(v) == 1 for v in layers.values())
    blocks = op_units(buf, model, example, ["features.0", "features.1", "pool", "emb"])
    # Each block holds its weighted op; the residual add joins the depthwise block before it.
    assert set(blocks) <= {"features.0", "features.1", "pool", "emb"}
    assert len(blocks["features.1"]) >= 2 and sum(map(len, blocks.values())) >= 4
    with pytest.raises(ToolchainError, match="cannot tell which ops"):
        op_units(buf, nn.Sequential(nn.Conv2d(3, 4, 1)), example, None)


def test_a_float_unit_leaves_a_mixed_file_litert_runs(calibrated):
    model, buf, example, inputs = calibrated
    units = op_units(buf, model, example, None)
    mixed = quantize_keeping_float(buf, units["features.0.0"])
    report = inspect_tflite(mixed, allow_float_ops=True)
    assert not report.problems and not report.is_int8 and report.float_ops.get("CONV_2D") == 1
    assert report.input_type == report.output_type == "INT8"
    assert inspect_tflite(quantize_keeping_float(buf, [])).is_int8
    # Not a mixed file: its float ops are problems.
    assert any("float tensors" in p for p in inspect_tflite(mixed).problems)
    out = litert_embeddings(mixed, inputs)
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())).numpy()
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_float_units_keep_their_weights_in_float16_behind_a_dequantize(calibrated):
    import tensorflow as tf
    from tensorflow.lite.python import convert

    from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name

    model, buf, example, inputs = calibrated
    units = op_units(buf, model, example, None)
    float32 = convert.mlir_quantize(buf, fully_quantize=True, input_data_type=tf.int8, output_data_type=tf.int8,
                                    denylisted_nodes=units["emb"])
    mixed = quantize_keeping_float(buf, units["emb"])
    schema, fb = load_flatbuffer(mixed)
    graph = fb.subgraphs[0]
    linear = next(op for op in graph.operators if op_name(schema, fb, op) == "FULLY_CONNECTED")
    weight = int(linear.inputs[1])
    unpack = [op for op in graph.operators if weight in op.outputs]
    assert len(unpack) == 1 and op_name(schema, fb, unpack[0]) == "DEQUANTIZE"
    assert graph.tensors[unpack[0].inputs[0]].type == schema.TensorType.FLOAT16
    assert graph.tensors[weight].type == schema.TensorType.FLOAT32 and not fb.buffers[graph.tensors[weight].buffer].data

    def data_bytes(f):
        return sum(len(b.data) for b in load_flatbuffer(f)[1].buffers if b.data is not None)

    assert data_bytes(float32) - data_bytes(mixed) == 2 * 16 * 8  # 2 of the 4 bytes of each of its 128 weights
    assert not inspect_tflite(mixed, allow_float_ops=True).problems
    a, b = litert_embeddings(mixed, inputs), litert_embeddings(float32, inputs)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9999
    all_int8 = quantize_keeping_float(buf, [])
    assert half_float_weights(all_int8) == all_int8  # nothing in float: the file is left as it is


def _views_and_reference(model, inputs):
    views = (inputs, np.ascontiguousarray(inputs[:, :, ::-1]))
    with torch.no_grad():
        ref = sum(model(torch.from_numpy(v.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float64) for v in views)
    return views, ref / np.linalg.norm(ref, axis=1, keepdims=True)


def test_forward_selection_keeps_what_reaches_the_target_within_the_size_budget(calibrated):
    model, buf, example, inputs = calibrated
    units = op_units(buf, model, example, None)
    views, ref = _views_and_reference(model, inputs)
    missed = choose_float_units(buf, units, views, ref, min_cosine_mean=1.1, min_cosine_min=None, max_units=2)
    assert not missed["met"] and missed["float_units"] == [] and len(missed["tried"]) == 2
    assert len({t.get("added") for t in missed["trail"][1:]}) == 2
    # The two-unit selection's own cosine is reachable: the same selection meets it and is kept.
    target = missed["trail"][2]["cosine_mean_low"]
    hit = choose_float_units(buf, units, views, ref, min_cosine_mean=target, min_cosine_min=None, max_units=3)
    assert hit["met"] and 1 <= len(hit["float_units"]) <= 2
    # No unit fits a budget of the all-int8 file's own size.
    tight = choose_float_units(buf, units, views, ref, min_cosine_mean=1.1, min_cosine_min=None, max_units=2,
                               max_bytes=missed["trail"][0]["bytes"])
    assert tight["tried"] == [] and len(tight["trail"]) == 1


def test_the_pte_choice_is_judged_when_the_greedy_steps_miss_and_kept_only_if_it_meets(calibrated):
    model, buf, example, inputs = calibrated
    units = op_units(buf, model, example, None)
    views, ref = _views_and_reference(model, inputs)
    two = choose_float_units(buf, units, views, ref, min_cosine_mean=1.1, min_cosine_min=None, max_units=2)
    pair, target = two["tried"], two["trail"][2]["cosine_mean_low"]
    assert target > two["trail"][1]["cosine_mean_low"]  # one greedy step cannot reach it
    got = choose_float_units(buf, units, views, ref, min_cosine_mean=target, min_cosine_min=None, max_units=1,
                             also_try=pair[::-1])
    assert got["met"] and got["from"] == ".pte" and got["float_units"] == pair[::-1] and got["tried"] == pair[:1]
    assert got["trail"][-1]["units"] == pair[::-1] and got["trail"][-1]["cosine_mean_low"] == pytest.approx(target)
    # Not kept when it misses too, when it is over the size budget, or when a name is not a unit here.
    for kwargs in ({"min_cosine_mean": 1.1}, {"min_cosine_mean": target, "max_bytes": two["trail"][1]["bytes"]}):
        kept = choose_float_units(buf, units, views, ref, **{"min_cosine_min": None, "max_units": 1, **kwargs},
                                  also_try=pair)
        assert not kept["met"] and kept["float_units"] == [] and "from" not in kept
    odd = choose_float_units(buf, units, views, ref, min_cosine_mean=target, min_cosine_min=None, max_units=1,
                             also_try=[pair[0], "nope"])
    assert not odd["met"] and len(odd["trail"]) == 2


def test_the_pte_choice_is_kept_when_it_meets_with_fewer_units_than_the_greedy_steps(monkeypatch):
    # Scores stand in for LiteRT: the ranking images favour `a`, so the greedy steps take `a` then
    # `b`, while `c` alone meets the target on all the measuring images.
    import toolchain.export.tflite_fallback as tf

    ranking = {(): 0.998, ("a",): 0.9990, ("b",): 0.9980, ("c",): 0.9985, ("a", "b"): 0.9995, ("a", "c"): 0.9993}
    judged = {(): 0.998, ("a",): 0.9985, ("b",): 0.9982, ("a", "b"): 0.9995, ("c",): 0.9992, ("b", "c"): 0.9994}

    def cosines(buf, views, reference, agreement=None):
        mean = (ranking if len(views[0]) < 64 else judged)[tuple(sorted(json.loads(buf)))]
        return {"cosine_mean": mean, "cosine_mean_low": mean, "cosine_min": mean, "set_aside": []}

    monkeypatch.setattr(tf, "quantize_keeping_float", lambda calibrated, ops: json.dumps(sorted(ops)).encode())
    monkeypatch.setattr(tf, "_cosines", cosines)
    units, views, ref = {"a": ["a"], "b": ["b"], "c": ["c"]}, (np.zeros((64, 1)), np.zeros((64, 1))), np.zeros(64)

    def choose(also_try):
        return tf.choose_float_units(b"", units, views, ref, min_cosine_mean=0.999, min_cosine_min=None,
                                     max_units=3, also_try=also_try)

    greedy = choose(())
    assert greedy["float_units"] == ["a", "b"] and "from" not in greedy
    fewer = choose(["c"])
    assert fewer["float_units"] == ["c"] and fewer["from"] == ".pte" and fewer["why"] == "fewer units"
    assert fewer["tried"] == ["a", "b"] and fewer["trail"][-1]["units"] == ["c"]
    # As many units: the greedy choice stands and nothing more is judged; fewer that miss: it stands too.
    same = choose(["b", "c"])
    assert same["float_units"] == ["a", "b"] and len(same["trail"]) == len(greedy["trail"])
    missing = choose(["b"])
    assert missing["float_units"] == ["a", "b"] and "from" not in missing
    # The backward pass already judged `b` alone (without `a`, and it missed): not judged again.
    assert missing["trail"] == greedy["trail"] and greedy["trail"][-1]["removed"] == "a"
    assert not any("units" in row for row in missing["trail"])


def test_choices_are_judged_on_the_finished_file_and_ranked_on_the_plain_one(monkeypatch):
    # Scores stand in for LiteRT; `finish` (the export's bias correction) marks the file. All int8,
    # the plain file misses the target and the corrected one meets it: nothing is kept in float.
    import toolchain.export.tflite_fallback as tf

    plain = {(): 0.9980, ("a",): 0.9992, ("b",): 0.9985, ("a", "b"): 0.9994}
    finished = {(): 0.9991, ("a",): 0.9993, ("b",): 0.9996, ("a", "b"): 0.9997}
    seen = []

    def cosines(buf, views, reference, agreement=None):
        ops, done = json.loads(buf)
        seen.append((tuple(ops), done, len(views[0])))
        mean = (finished if done else plain)[tuple(ops)]
        return {"cosine_mean": mean, "cosine_mean_low": mean, "cosine_min": mean, "set_aside": []}

    monkeypatch.setattr(tf, "quantize_keeping_float", lambda calibrated, ops: json.dumps([sorted(ops), False]).encode())
    monkeypatch.setattr(tf, "_cosines", cosines)

    def finish(buf):
        return json.dumps([json.loads(buf)[0], True]).encode()

    units, views, ref = {"a": ["a"], "b": ["b"]}, (np.zeros((64, 1)), np.zeros((64, 1))), np.zeros(64)

    def choose(target, finish=None):
        seen.clear()
        return tf.choose_float_units(b"", units, views, ref, min_cosine_mean=target, min_cosine_min=None,
                                     max_units=2, finish=finish)

    assert choose(0.999)["float_units"] == ["a"]  # judged plain, all int8 misses
    got = choose(0.999, finish)
    assert got["met"] and got["float_units"] == [] and got["trail"][0]["cosine_mean"] == 0.9991
    # Past the all-int8 file, candidates are ranked on plain files and each choice judged finished:
    # ranked plain, `a` leads; judged finished, `a` misses 0.9995, the pair meets it, and the
    # backward pass finds that `b` alone meets it too.
    got = choose(0.9995, finish)
    assert got["tried"] == ["a", "b"] and [r["cosine_mean"] for r in got["trail"][:3]] == [0.9991, 0.9993, 0.9997]
    assert got["float_units"] == ["b"]
    assert {(ops, done) for ops, done, n in seen if n < 64} == {(("a",), False), (("b",), False), (("a", "b"), False)}
    assert all(done for ops, done, n in seen if n == 64)


def test_out_of_room_the_tflite_steps_are_ranked_again_by_gain_per_byte_of_the_file(monkeypatch):
    # Scores and sizes stand in for LiteRT and the converter: `big` gains most and costs 50 KB;
    # the small units reach the target together in 15 KB, where `big` and one of them miss it.
    import toolchain.export.tflite_fallback as tf

    gain = {"big": 0.0005, "s1": 0.00035, "s2": 0.00035, "s3": 0.00035}
    cost = {"big": 50_000, "s1": 5_000, "s2": 5_000, "s3": 5_000}

    def file_keeping(calibrated, ops):  # the file's length is its size
        names = json.dumps(sorted(ops)).encode()
        return names + b" " * (100_000 + sum(cost[o] for o in ops) - len(names))

    def cosines(buf, views, reference, agreement=None):
        mean = 0.9985 + sum(gain[o] for o in json.loads(buf))
        return {"cosine_mean": mean, "cosine_mean_low": mean, "cosine_min": 0.995, "set_aside": []}

    monkeypatch.setattr(tf, "quantize_keeping_float", file_keeping)
    monkeypatch.setattr(tf, "_cosines", cosines)
    units, views, ref = {u: [u] for u in gain}, (np.zeros((64, 1)), np.zeros((64, 1))), np.zeros(64)
    got = tf.choose_float_units(b"", units, views, ref, min_cosine_mean=0.9994, min_cosine_min=None, max_units=4,
                                max_bytes=157_000)
    assert got["tried"] == ["big", "s1"] and got["met"] and got["per_byte"] == {"tried": ["s1", "s2", "s3"], "met": True}
    assert got["float_units"] == ["s1", "s2", "s3"] and "from" not in got
    assert max(t["bytes"] for t in got["trail"]) <= 157_000
    # Without a size budget nothing is refused: the largest-gain steps meet it, with no second pass.
    free = tf.choose_float_units(b"", units, views, ref, min_cosine_mean=0.9994, min_cosine_min=None, max_units=4)
    assert free["met"] and "per_byte" not in free and free["tried"][0] == "big"


def test_the_tflite_plan_takes_the_pte_units_to_try_only_when_they_are_the_same_kind():
    from toolchain.export.api import _Int8Graph, _tflite_float_plan
    from toolchain.quantize.int8_options import Int8Options

    model = _Blocks().eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    tfl = _Int8Graph(model, Int8Options(fallback=True, fallback_unit="block"), images, {}, measure=images)
    targets = {"min_cosine_mean": 0.999}

    def pte(unit):
        return _Int8Graph(model, Int8Options(float_layers=("features.1",), fallback_unit=unit), images, {})

    plan = _tflite_float_plan(model, model.spec, tfl, model, torch.zeros(1, 3, 32, 32), targets, False, pte("block"))
    assert plan.also_try == ("features.1",) and plan.fallback
    other = _tflite_float_plan(model, model.spec, tfl, model, torch.zeros(1, 3, 32, 32), targets, False, pte("layer"))
    assert other.also_try == ()


def test_export_names_a_tflite_with_float_layers_mixed(tmp_path):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    rec = export_model(_Blocks().eval(), tmp_path, "tflite", "int8", images, progress=False,
                       int8={"float_layers": ["features.1"], "fallback_unit": "block"})[0]
    assert rec.file == "tiny-blocks_int8_mixed.tflite" and rec.checks["int8_method"]["float_layers"] == ["features.1"]
    assert rec.checks["tflite"]["float_ops"].get("DEPTHWISE_CONV_2D") == 1
    recovery = json.loads((tmp_path / "export_manifest.json").read_text())["int8_recovery"]
    assert recovery["tflite_fallback"] == {"float_units": ["features.1"], "given": True, "unit": "block"}
    with pytest.raises(ToolchainError, match="float_layers: nope not among"):
        export_model(_Blocks().eval(), tmp_path / "bad", "tflite", "int8", images, progress=False,
                     int8={"float_layers": ["nope"]})


def test_plan_reports_its_choice_and_latency_cost_or_why_it_kept_nothing(calibrated):
    model, buf, example, inputs = calibrated
    views, ref = _views_and_reference(model, inputs)
    probe = FloatPlan(model, example, fallback=True, views=views, reference=ref, targets={"min_cosine_mean": 1.1},
                      max_units=1)
    assert probe.float_ops(buf) == [] and not probe.report["met"]
    reachable = probe.report["trail"][1]["cosine_mean_low"]
    plan = FloatPlan(model, example, fallback=True, views=views, reference=ref,
                     targets={"min_cosine_mean": reachable}, max_units=1)
    ops = plan.float_ops(buf)
    assert plan.report["met"] and plan.report["float_units"] == [probe.report["trail"][1]["added"]] and ops
    assert plan.report["judged_bias_corrected"] is False
    lat = plan.report["latency"]
    assert lat["with_float_layers"] > 0 and lat["all_int8"] > 0 and lat["ratio"] > 0
    # Ops that cannot be matched to the model's layers: the file stays all int8, and the report says why.
    other = FloatPlan(nn.Sequential(nn.Conv2d(3, 4, 1)), example, fallback=True, views=views, reference=ref,
                      targets={"min_cosine_mean": 1.1})
    assert other.float_ops(buf) == [] and "cannot tell which ops" in other.report["error"]


def test_a_depthwise_conv_may_be_a_depthwise_or_a_grouped_conv_in_the_file():
    from toolchain.export.tflite_fallback import _torch_layers

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1), nn.Flatten(1), nn.Linear(6 * 4 * 4, 3))
    (dw, dw_forms), (pw, pw_forms), (fc, fc_forms) = _torch_layers(model, torch.zeros(1, 4, 6, 6))
    assert (dw, pw, fc) == ("0", "1", "3")
    assert set(dw_forms) == {("DEPTHWISE_CONV_2D", (1, 3, 3, 4)), ("CONV_2D", (4, 3, 3, 1))}
    assert set(pw_forms) == {("CONV_2D", (6, 1, 1, 4))} and set(fc_forms) == {("FULLY_CONNECTED", (3, 96))}
    # Each form holds the weights in the file's layout: channel c of the depthwise conv alike in both.
    w = model[0].weight.detach().numpy()
    assert np.array_equal(dw_forms[("DEPTHWISE_CONV_2D", (1, 3, 3, 4))][0, :, :, 2], w[2, 0])
    assert np.array_equal(dw_forms[("CONV_2D", (4, 3, 3, 1))][2, :, :, 0], w[2, 0])


def test_weighted_ops_match_layers_by_weight_direction_when_branches_are_reordered():
    from types import SimpleNamespace

    from toolchain.export.tflite_fallback import _match_layers

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 3, 3, 2))  # two parallel convs, OHWI
    layers = [("branch_a", {("CONV_2D", a.shape): a}), ("branch_b", {("CONV_2D", b.shape): b}),
              ("gate_1", {("DEPTHWISE_CONV_2D", (1, 1, 1, 4)): np.ones((1, 1, 1, 4))}),
              ("gate_2", {("DEPTHWISE_CONV_2D", (1, 1, 1, 4)): np.ones((1, 1, 1, 4))})]
    # The file runs branch b first, each with BatchNorm folded in (a scale per output channel).
    folded = [b * rng.uniform(0.5, 2, (4, 1, 1, 1)), a * rng.uniform(-2, -0.5, (4, 1, 1, 1)),
              np.full((1, 1, 1, 4), 0.3), np.full((1, 1, 1, 4), 0.7)]
    kinds = ["CONV_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "DEPTHWISE_CONV_2D"]
    tensors = [SimpleNamespace(shape=w.shape, buffer=i) for i, w in enumerate(folded)]
    buffers = [SimpleNamespace(data=np.frombuffer(w.astype("<f4").tobytes(), np.uint8)) for w in folded]
    ops = [SimpleNamespace(inputs=[0, i]) for i in range(4)]
    owner = _match_layers(SimpleNamespace(buffers=buffers), SimpleNamespace(tensors=tensors),
                          list(zip(kinds, ops)), layers)
    # Weight directions tell the branches apart; 1x1 depthwise weights cannot, so order does.
    assert [owner[id(op)] for op in ops] == ["branch_b", "branch_a", "gate_1", "gate_2"]


def test_full_range_units_are_named_by_block_or_layer(calibrated):
    model, buf, example, _ = calibrated
    blocks = op_units(buf, model, example, ["features.0", "features.1", "pool", "emb"])
    assert unit_tensors(buf, model, example, ["features.1"]) == blocks["features.1"]
    assert unit_tensors(buf, model, example, ["emb"]) == op_units(buf, model, example, None)["emb"]
    with pytest.raises(ToolchainError, match="full_range_layers: nope is neither a block"):
        unit_tensors(buf, model, example, ["nope"])


def test_export_keeps_full_range_layers_in_both_files_int8(tmp_path):
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    int8 = {"calibration": "percentile", "full_range_layers": ["features.0"]}
    recs = export_model(_Blocks().eval(), tmp_path, ["executorch", "tflite"], "int8", images, progress=False,
                        int8=int8)
    assert sorted(r.file for r in recs) == ["tiny-blocks_int8.pte", "tiny-blocks_int8.tflite"]
    assert all(r.checks["int8_method"]["full_range_layers"] == ["features.0"] for r in recs)
    with pytest.raises(ToolchainError, match="full_range_layers: nope"):
        export_model(_Blocks().eval(), tmp_path / "bad", "tflite", "int8", images, progress=False,
                     int8={**int8, "full_range_layers": ["nope"]})
