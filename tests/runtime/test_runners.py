import numpy as np
import pytest
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.models import build_model
from toolchain.models.io import save_checkpoint, save_enrollment
from toolchain.runtime import load_runner, read_embedded_metadata
from toolchain.runtime.executorch_runner import ExecuTorchRunner
from toolchain.runtime.litert_runner import LiteRTRunner
from toolchain.runtime.preprocess import dequantize, model_input, normalise, quantize


def _imgs(n, hw=(112, 112), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_normalise_and_layout():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0] = [255, 0, 128]
    x = normalise(img, (0.5,) * 3, (0.5,) * 3)
    assert x[0, 0, 0, 0] == pytest.approx(1.0) and x[0, 0, 0, 1] == pytest.approx(-1.0)
    nchw = model_input(img, (0.5,) * 3, (0.5,) * 3)
    assert nchw.shape == (1, 3, 2, 2) and nchw[0, 0, 0, 0] == pytest.approx(1.0)


def test_quantize_round_trip_and_clipping():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 5.0], np.float32)
    q = quantize(x, 1 / 127.5, -1)
    assert q.dtype == np.int8 and q[0] == -128 and q[-1] == 127
    assert np.allclose(dequantize(q, 1 / 127.5, -1)[1:5], x[1:5], atol=1 / 127.5)


def test_torch_runner_batches_and_matches_model():
    torch.manual_seed(0)
    model = build_model("verifier", width=4).eval()
    runner = load_runner(model)
    imgs = _imgs(5)
    y = runner.run(imgs, batch_size=2)
    with torch.no_grad():
        ref = model(torch.from_numpy(model_input(imgs, (0.5,) * 3, (0.5,) * 3))).numpy()
    assert y.shape == (5, 1) and y.dtype == np.float32 and np.allclose(y, ref, atol=1e-6)
    assert runner.latency_ms(repeats=3, warmup=1) > 0
    assert torch.get_num_threads() >= 1  # restored after the single-thread timing


def test_runner_refuses_wrong_input():
    runner = load_runner(build_model("verifier", width=4).eval())
    with pytest.raises(ToolchainError, match="wrong input size 64x64"):
        runner.run(_imgs(1, (64, 64)))
    with pytest.raises(ToolchainError, match="uint8"):
        runner.run(_imgs(1).astype(np.float32))
    with pytest.raises(ToolchainError, match=r"\(N, H, W, 3\)"):
        runner.run(np.zeros((1, 3, 112, 112), np.uint8))


def test_load_runner_from_checkpoint_and_user_dir(tmp_path):
    torch.manual_seed(0)
    model = build_model("verifier", width=4).eval()
    save_checkpoint(tmp_path / "ckpt.pt", "verifier", {"width": 4}, model.state_dict())
    save_enrollment(tmp_path / "user", model, {"width": 4}, threshold=0.25)
    imgs = _imgs(2)
    a, b = load_runner(tmp_path / "ckpt.pt"), load_runner(tmp_path / "user")
    assert np.allclose(a.run(imgs), b.run(imgs)) and b.threshold == 0.25
    with pytest.raises(ToolchainError):
        load_runner(tmp_path / "nothing.pt")


@pytest.mark.slow
def test_executorch_runner_hides_layout(tmp_path):
    """A tiny fp32 .pte: the runner's output equals eager's for uint8 NHWC images."""
    from toolchain.export import export_model

    torch.manual_seed(0)
    model = build_model("verifier", width=4).eval()
    rec = export_model(model, tmp_path, formats="executorch", precisions="fp32", threshold=0.5,
                       model_kwargs={"width": 4}, progress=False)[0]
    runner = load_runner(rec.path)
    assert runner.kind == "executorch" and runner.info.layout == "NCHW" and runner.threshold == 0.5
    imgs = _imgs(3)
    assert np.allclose(runner.run(imgs), load_runner(model).run(imgs), atol=1e-5)
    assert read_embedded_metadata(rec.path)["model"] == "verifier"
    # In-runtime latency from ETDump, and the Python call apart (wall time of the untraced program).
    lat = runner.runtime_latency(repeats=5, warmup=2)
    assert lat["source"] == "ETDump Method::execute"
    assert lat["runtime_ms"] > 0 and lat["wall_ms"] > 0
    assert lat["overhead_ms"] == pytest.approx(lat["wall_ms"] - lat["runtime_ms"])
    # Without toolchain metadata a runner refuses to guess the normalisation.
    bare = tmp_path / "bare.pte"
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    prog = torch.export.export(model, (torch.zeros(1, 3, 112, 112),))
    bare.write_bytes(to_edge_transform_and_lower(prog, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    assert read_embedded_metadata(bare) == {}
    with pytest.raises(ToolchainError, match="no toolchain metadata"):
        load_runner(bare)


def test_read_embedded_metadata_errors(tmp_path):
    with pytest.raises(ToolchainError, match="no such file"):
        read_embedded_metadata(tmp_path / "x.tflite")
    (tmp_path / "x.onnx").write_bytes(b"abc")
    with pytest.raises(ToolchainError, match="unknown artifact format"):
        read_embedded_metadata(tmp_path / "x.onnx")
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ToolchainError):
        read_embedded_metadata(tmp_path / "bad.tflite")


@pytest.mark.parametrize("suffix", [".pte", ".tflite"])
def test_random_bytes_are_refused_before_the_runtime_parses_them(tmp_path, suffix):
    """ExecuTorch's loader aborted the whole process (SIGABRT, no message) on these 4 KB of
    random bytes; the file identifier is checked first, with or without metadata given."""
    f = tmp_path / f"random{suffix}"
    f.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ToolchainError, match="file identifier is missing"):
        load_runner(f)
    runner_class = ExecuTorchRunner if suffix == ".pte" else LiteRTRunner
    with pytest.raises(ToolchainError, match="file identifier is missing"):
        runner_class(f, metadata={"output": "embedding"})


def test_one_op_tflite_runs_and_times_the_call():
    """The one-op model LiteRT's call overhead is measured on is a valid .tflite computing RELU."""
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.runtime.litert_runner import invoke_overhead_ms, one_op_tflite

    interpreter = Interpreter(model_content=one_op_tflite(), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.array([[-1, 2, -3, 4]], np.float32))
    interpreter.invoke()
    assert interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).tolist() == [[0, 2, 0, 4]]
    assert 0 < invoke_overhead_ms(repeats=50) < 1.0  # a call, not an inference: well under a millisecond
