"""End to end for the verifier: CLI export of an enrolled user folder to both formats, int8 and
fp32; then checks on the files, the runtimes and the parity command. One export, shared."""

import json
from pathlib import Path

import numpy as np
import pytest

from toolchain.cli import main
from toolchain.export import read_embedded_metadata
from toolchain.runtime.manifest import MANIFEST_NAME, sha256_file
from toolchain.export.tflite_check import inspect_tflite
from toolchain.evaluate.parity import write_probe_set
from toolchain.runtime import load_runner

pytestmark = pytest.mark.slow
THRESHOLD = 0.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory, enrolled_random_verifier):
    root = tmp_path_factory.mktemp("verifier_export")
    model, user, rng = enrolled_random_verifier(root, THRESHOLD)
    out = root / "out"
    rc = main(["export", str(user), "--out", str(out), "--calibration", str(root / "calib.npy"),
               "--calibration-size", "8", "--json"])
    assert rc == 0
    images = rng.integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    return {"root": root, "out": out, "user": user, "model": model, "images": images,
            "manifest": json.loads((out / MANIFEST_NAME).read_text())}


def _files(out):
    return sorted(p.name for p in out.iterdir())


def test_files_and_manifest(exported):
    out, man = exported["out"], exported["manifest"]
    assert _files(out) == sorted(["export_manifest.json", "verifier_fp32.pte", "verifier_fp32.tflite",
                                  "verifier_int8.pte", "verifier_int8.tflite"])
    assert man["source"]["kind"] == "user_dir" and man["reference"] == str(exported["user"].resolve())
    assert man["threshold"] == THRESHOLD and man["calibration"]["images"] == 8
    assert len(man["artifacts"]) == 4
    for a in man["artifacts"]:
        p = out / a["file"]
        assert a["sha256"] == sha256_file(p) and a["bytes"] == p.stat().st_size
        assert a["format"] in ("executorch", "tflite") and a["precision"] in ("int8", "fp32")
        assert a["backend"] == ("xnnpack" if a["format"] == "executorch" else "onnx2tf")


def test_pte_fully_delegated(exported):
    for a in exported["manifest"]["artifacts"]:
        if a["format"] == "executorch":
            d = a["checks"]["delegation"]
            assert d["partitions"] == 1 and d["ops_outside"] == {} and d["fully_delegated"], d
            assert d["float_ops"] == {}, d  # no float island inside the int8 graph


def test_int8_pte_transposes_its_input_as_float_then_quantises_it(exported):
    # toolchain.export.nhwc_input: no transpose of the quantised 3-channel input (XNNPACK's slow
    # X8 kernel), and no row-stem reshape, between the input and the stem convolution.
    from toolchain.export.xnnpack_graph import xnnpack_nodes

    nodes = xnnpack_nodes((exported["out"] / "verifier_int8.pte").read_bytes())
    first_conv = next(i for i, n in enumerate(nodes) if n["op"] == "Conv2d")
    assert [(n["op"], n["precision"]) for n in nodes[:first_conv]] == \
        [("StaticTranspose", "fp32"), ("Convert", "fp32->int8")]


def test_int8_tflite_flatbuffer_check(exported):
    out = exported["out"]
    rep = inspect_tflite((out / "verifier_int8.tflite").read_bytes())
    assert rep.is_int8, rep.problems
    assert rep.input_type == "INT8" and rep.output_type == "INT8"
    assert rep.ops["CONV_2D"] >= 4 and rep.ops["FULLY_CONNECTED"] == 2 and not rep.xnnpack_unsupported
    assert rep.ops["RESHAPE"] == 1 and "TRANSPOSE" not in rep.ops  # the row stem (export/row_stem.py)
    fp = inspect_tflite((out / "verifier_fp32.tflite").read_bytes())
    assert not fp.is_int8 and any("FLOAT32" in p for p in fp.problems)


def test_int8_file_sizes(exported):
    # The verifier's int8 budget: at most 40 KB (KiB) per file, metadata included.
    for name in ("verifier_int8.pte", "verifier_int8.tflite"):
        assert (exported["out"] / name).stat().st_size <= 40 * 1024, name


def test_embedded_metadata_round_trip(exported):
    out = exported["out"]
    for a in exported["manifest"]["artifacts"]:
        meta = read_embedded_metadata(out / a["file"])
        assert meta["model"] == "verifier" and meta["output"] == "logit" and meta["threshold"] == THRESHOLD
        assert meta["precision"] == a["precision"] and meta["format"] == a["format"]
        # (p - 128) / 128: the verifier folds its input normalisation (quantize/exact_input.py)
        assert meta["input"]["mean"] == [128 / 255] * 3 and meta["input"]["std"] == [128 / 255] * 3
        assert meta["input"]["shape"] == a["input_shape"]
        assert "torch" in meta["tool_versions"]
    m8 = read_embedded_metadata(out / "verifier_int8.tflite")
    rep = inspect_tflite((out / "verifier_int8.tflite").read_bytes())
    assert m8["input"]["layout"] == "NHWC" and m8["input"]["dtype"] == "int8"
    assert m8["input"]["quantization"] == rep.input_quant and m8["output_tensor"]["quantization"] == rep.output_quant
    pte = read_embedded_metadata(out / "verifier_int8.pte")
    assert pte["input"]["layout"] == "NCHW" and pte["internal_quantization"]["output"]["dtype"] == "int8"
    assert pte["internal_quantization"]["input"]["after"] == "input"  # the row stem's reshape is no op
    # The typed constant methods agree with the JSON.
    from executorch.runtime import Runtime

    prog = Runtime.get().load_program(str(out / "verifier_int8.pte"))
    assert len(prog.load_method("quant_params").execute([])) == 4
    assert list(prog.load_method("forward").metadata.input_tensor_meta(0).sizes()) == [1, 3, 112, 112]
    assert prog.load_method("threshold").execute([])[0] == pytest.approx(THRESHOLD)


def test_runners_match_eager(exported):
    images = exported["images"]
    ref = load_runner(exported["user"]).run(images)
    assert ref.shape == (6, 1)
    spread = float(np.ptp(ref)) + 1e-6
    for a in exported["manifest"]["artifacts"]:
        runner = load_runner(exported["out"] / a["file"])
        y = runner.run(images)
        assert y.shape == ref.shape and y.dtype == np.float32
        gap = float(np.abs(y - ref).max())
        if a["precision"] == "fp32":
            assert gap < 1e-4, (a["file"], gap)
        else:
            assert gap < max(0.05, 0.5 * spread), (a["file"], gap, spread)
        assert runner.latency_ms(repeats=5, warmup=1) > 0


def test_parity_cli_bounds(exported, capsys):
    out, root = exported["out"], exported["root"]
    rng = np.random.default_rng(1)
    probe = write_probe_set(root / "probe.npz", rng.integers(0, 256, (20, 112, 112, 3), dtype=np.uint8),
                            np.arange(20) % 2 == 0)
    arts = [str(out / "verifier_int8.pte"), str(out / "verifier_int8.tflite")]
    capsys.readouterr()
    rc = main(["parity", *arts, "--pairs", str(probe), "--json", "--repeats", "3",
               "--max-accuracy-drop", "100", "--min-agreement", "0"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(rows) == 2
    for r in rows:
        for k in ("artifact", "accuracy", "float_accuracy", "decision_agreement", "latency_ms", "max_abs_gap",
                  "mean_abs_gap", "passed", "scores", "float_scores"):
            assert k in r
        assert r["kind"] == "verifier" and r["threshold"] == THRESHOLD and len(r["scores"]) == 20
        assert 0 <= r["decision_agreement"] <= 100 and r["max_abs_gap"] >= r["mean_abs_gap"] >= 0
    # An impossible bound fails the check: exit 1.
    assert main(["parity", arts[0], "--pairs", str(probe), "--repeats", "2", "--max-accuracy-drop", "-1"]) == 1


def test_int8_input_is_the_exact_pixel_grid(exported):
    # The verifier's artifacts take (p - 128)/128, so the int8 input is q = p - 128 exactly.
    out = exported["out"]
    for name in ("verifier_int8.pte", "verifier_int8.tflite"):
        meta = read_embedded_metadata(out / name)
        assert meta["input"]["mean"] == [128 / 255] * 3 and meta["input"]["std"] == [128 / 255] * 3
        q = meta["input"]["quantization"] or meta["internal_quantization"]["input"]
        assert q["scale"] == pytest.approx(1 / 128, abs=1e-9) and q["zero_point"] == 0, (name, q)


def _run_tflite(buf: bytes, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.runtime.preprocess import dequantize, normalise, quantize

    interp = Interpreter(model_content=buf)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    x = quantize(normalise(images, [128 / 255] * 3, [128 / 255] * 3), *inp["quantization"])
    ys = []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], x[i:i + 1])
        interp.invoke()
        ys.append(dequantize(interp.get_tensor(out["index"]), *out["quantization"]))
    return np.concatenate(ys)[:, 0]


def test_output_aligned_with_a_threshold_still_computes_the_same(exported):
    # Moving the int8 output's scale/zero-point in the file is consistent: the kernels read them
    # when prepared. Afterwards the threshold sits half-way between two int8 steps.
    from toolchain.export.tflite import align_tflite_output

    buf = (exported["out"] / "verifier_int8.tflite").read_bytes()
    before = _run_tflite(buf, exported["images"])
    threshold = float(np.median(before)) + 0.01
    aligned = align_tflite_output(buf, threshold)
    q = inspect_tflite(aligned).output_quant
    steps = threshold / q["scale"] + q["zero_point"]
    assert abs(steps - np.floor(steps) - 0.5) < 1e-3, steps
    after = _run_tflite(aligned, exported["images"])
    old_scale = inspect_tflite(buf).output_quant["scale"]
    assert np.abs(after - before).max() <= max(q["scale"], old_scale) + 1e-6


@pytest.mark.parametrize("threshold", ["high", None, float("nan")])
def test_a_threshold_that_is_not_a_finite_number_is_refused(tmp_path, capsys, threshold):
    """A string was an internal error; nan was written to the files' metadata and the manifest."""
    from toolchain.models import build_model
    from toolchain.models.io import save_enrollment

    user = tmp_path / "user"
    save_enrollment(user, build_model("verifier", width=4).eval(), {"width": 4}, threshold=0.25)
    meta = json.loads((user / "enrollment.json").read_text())
    meta["threshold"] = threshold
    (user / "enrollment.json").write_text(json.dumps(meta))
    rc = main(["export", str(user), "--out", str(tmp_path / "out"), "--formats", "executorch", "--precisions", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and ("not a finite number" in err or "needs a decision threshold" in err), err
    assert not list(tmp_path.glob("out/*.pte"))  # nothing exported
