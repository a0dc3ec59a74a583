"""`toolchain bench`: one row per model with sizes, latencies and int8/fp32 ratios from one run."""

import json

import pytest

from toolchain.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["onnx2tf", "litert-torch"])
def test_bench_verifier_row(tmp_path, capsys, backend):
    if backend == "litert-torch":
        pytest.importorskip("litert_torch")
    rc = main(["bench", "verifier", "--out", str(tmp_path), "--formats", "tflite", "--repeats", "3",
               "--rounds", "2", "--pairs", "20", "--calibration-size", "8", "--tflite-backend", backend, "--json", str(tmp_path / "bench.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "measured verifier" in out and "int8/fp32" in out and "CPU:" in out
    assert not out.lstrip().startswith(("{", "["))  # the table, not a raw JSON line
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["cpu"]["model"]
    rows = report["rows"]
    assert len(rows) == 1 and rows[0]["model"] == "verifier" and "error" not in rows[0]
    a = rows[0]["artifacts"]["tflite"]
    assert a["backend"] == backend
    assert 0 < a["int8_bytes"] < a["fp32_bytes"] and a["int8_bytes"] <= 40 * 1024
    assert a["int8_ms"] > 0 and a["fp32_ms"] > 0 and a["ratio"] == pytest.approx(a["int8_ms"] / a["fp32_ms"])
    # In-runtime time, with the Python call apart: never more than the wall time around it.
    assert a["int8_ms"] <= a["int8_wall_ms"] and a["call_overhead_ms"] >= 0
    assert a["latency_source"].startswith("invoke()")
    # Two rounds, int8 and fp32 in turn; a sub-millisecond file runs more calls than --repeats.
    lo, hi = a["ratio_range"]
    assert a["rounds"] == 2 and 0 < lo <= hi and a["int8_calls"] > 3
    assert "target" in out and ("met" in out or "MISSED" in out)
    assert a["outside"] == {}  # the verifier: nothing left outside int8


def test_bench_table_renders_a_failed_model(tmp_path):
    from rich.console import Console

    from toolchain.export.bench import render_table

    console = Console(record=True, width=200)
    console.print(render_table([{"model": "broken", "error": "lowering failed", "artifacts": {}}]))
    assert "FAILED: lowering failed" in console.export_text()


def test_bench_table_hides_accuracy_of_random_weights():
    from rich.console import Console

    from toolchain.export.bench import render_table

    art = {"int8_bytes": 1024, "fp32_bytes": 4096, "int8_ms": 1.0, "fp32_ms": 2.0, "ratio": 0.5, "eager_ms": 3.0,
           "call_overhead_ms": 0.01,
           "accuracy_drop": 12.34, "decision_agreement": 56.7, "cosine_mean": None, "cosine_min": None,
           "outside": {}, "backend": "onnx2tf"}
    rows = [{"model": "rand", "random_init": True, "artifacts": {"tflite": art}},
            {"model": "trained", "random_init": False, "artifacts": {"tflite": art}}]
    console = Console(record=True, width=250)
    console.print(render_table(rows))
    lines = {ln.split("│")[1].strip(): ln for ln in console.export_text().splitlines() if ln.count("│") > 3}
    assert "+12.34" not in lines["rand (random init)"] and "56.7" not in lines["rand (random init)"]
    assert "+12.34" in lines["trained"] and "56.7" in lines["trained"]


@pytest.mark.parametrize("int8_dot,ratio,verdict", [(True, 0.6, "met"), (True, 0.61, "MISSED"),
                                                    (False, 0.99, "met"), (False, 1.0, "MISSED")])
def test_bench_target_depends_on_the_cpu(int8_dot, ratio, verdict):
    """At most 0.6 x fp32 with int8 dot products; strictly faster than fp32 without."""
    from rich.console import Console

    from toolchain.export.bench import render_table

    art = {"int8_bytes": 1024, "fp32_bytes": 4096, "int8_ms": ratio, "fp32_ms": 1.0, "ratio": ratio, "eager_ms": 3.0,
           "call_overhead_ms": 0.01, "accuracy_drop": 0.0, "decision_agreement": 100.0, "cosine_mean": None,
           "cosine_min": None, "outside": {}, "backend": "onnx2tf"}
    cpu = {"model": "test CPU", "arch": "x86_64", "cores": 2, "int8_features": [], "int8_dot": int8_dot}
    console = Console(record=True, width=250)
    console.print(render_table([{"model": "m", "random_init": True, "artifacts": {"tflite": art}}], cpu))
    row = next(ln for ln in console.export_text().splitlines() if ln.startswith("│ m"))
    assert verdict in row and ("MISSED" in row) == (verdict == "MISSED")


def test_interleaved_latency_alternates_and_sizes_rounds(monkeypatch):
    """One slow spell (the second measurement runs 3 x slow) lands in one round of one file: the
    medians over rounds keep the true ratio (0.5), and the round's range shows the spell. A
    0.05-ms file runs more calls than `repeats`."""
    import toolchain.runtime as runtime
    from toolchain.export import bench

    order = []

    class FakeRunner:
        def __init__(self, ms):
            self.ms = ms

        def latency_ms(self, repeats=50, warmup=5, seed=0):
            return self.ms

        def runtime_latency(self, repeats=50, warmup=5, seed=0):
            order.append((self.ms, repeats))
            t = self.ms * (3.0 if len(order) == 2 else 1.0)
            return {"wall_ms": t + 0.01, "runtime_ms": t, "overhead_ms": 0.01, "source": "fake"}

    monkeypatch.setattr(runtime, "load_runner", lambda p: FakeRunner(p))
    lat = bench.interleaved_latency({"int8": 0.05, "fp32": 0.1}, repeats=10, rounds=3)
    assert [ms for ms, _ in order] == [0.05, 0.1] * 3  # in turn, round after round
    assert lat["int8"]["calls"] == bench.MAX_CALLS and lat["fp32"]["calls"] == bench.MAX_CALLS
    assert lat["int8"]["runtime_ms"] / lat["fp32"]["runtime_ms"] == pytest.approx(0.5)
    assert bench._ratio_range(lat["int8"]["rounds_ms"], lat["fp32"]["rounds_ms"]) == pytest.approx([0.5 / 3, 0.5])
    slow = bench.interleaved_latency({"big": 20.0}, repeats=10, rounds=1)
    assert slow["big"]["calls"] == 10  # 10 calls of 20 ms already exceed MIN_ROUND_S


@pytest.mark.parametrize("amx,hint", [(None, True), ("denied", False)])
def test_bench_caption_points_an_amx_cpu_to_no_amx(amx, hint):
    from rich.console import Console

    from toolchain.export.bench import render_table

    cpu = {"model": "test CPU", "arch": "x86_64", "cores": 2, "int8_features": ["AVX512-VNNI", "AMX-INT8"],
           "int8_dot": True} | ({"amx": amx} if amx else {})
    console = Console(record=True, width=250)
    console.print(render_table([], cpu))
    assert ("--no-amx measures its VNNI ones" in console.export_text()) == hint


def _tiny_tflite(shape=(1, 16, 16, 3)) -> bytes:
    import tensorflow as tf

    from toolchain.export.metadata import embed_tflite_metadata

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def relu(x):
        return tf.nn.relu(x * 2.0)

    buf = tf.lite.TFLiteConverter.from_concrete_functions([relu.get_concrete_function()], relu).convert()
    meta = {"output": "embedding", "input": {"layout": "NHWC", "mean": [0.5] * 3, "std": [0.5] * 3}}
    return embed_tflite_metadata(buf, meta)  # what the runtime's runner reads: the input's layout and scaling


def test_run_latency_times_a_runs_int8_file_against_its_fp32_file_with_amx_denied(tmp_path):
    # benchmarks/bench_run_latency.py in its own process: the AMX denial holds for the process.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    buf = _tiny_tflite()
    (export / "m_int8_mixed.tflite").write_bytes(buf)
    (export / "m_fp32.tflite").write_bytes(buf)
    out = tmp_path / "latency.json"
    args = [sys.executable, str(root / "benchmarks" / "bench_run_latency.py"), str(tmp_path / "run"),
            "--rounds", "2", "--repeats", "3", "--json", str(out), "--no-amx"]
    run = subprocess.run(args, capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert "AMX denied" in report["cpu"] or "--no-amx" in report["cpu"]
    (row,) = report["rows"]
    assert row["int8"] == "m_int8_mixed.tflite" and row["fp32"] == "m_fp32.tflite"
    assert row["int8_ms"] > 0 and row["ratio"] == pytest.approx(row["int8_ms"] / row["fp32_ms"])
    assert row["round_range"][0] <= row["round_range"][1]
    # A run folder without such a pair: one line, exit 1.
    (export / "m_fp32.tflite").unlink()
    run = subprocess.run(args, capture_output=True, text=True, cwd=root)
    assert run.returncode == 1 and "holds no int8 and fp32 file" in run.stderr and "Traceback" not in run.stderr
    # A file that is no image model: one line, exit 1.
    (export / "m_fp32.tflite").write_bytes(_tiny_tflite((1, 64)))
    run = subprocess.run(args, capture_output=True, text=True, cwd=root)
    assert run.returncode == 1 and "expected a 4-D image input" in run.stderr and "Traceback" not in run.stderr


def test_bench_refuses_an_unknown_model_before_exporting_anything(tmp_path, capsys, monkeypatch):
    from toolchain.export import bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("exported before checking the names"))
    rc = main(["bench", "verifier", "nosuchmodel", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "nosuchmodel: neither a file" in err and len(err.strip().splitlines()) == 1


def test_bench_exits_one_when_a_model_fails_to_export(tmp_path, capsys, monkeypatch):
    from toolchain.export import bench

    def one_fails(models, *a, **k):
        return [{"model": "verifier", "error": "onnx2tf crashed", "artifacts": {}}]

    monkeypatch.setattr(bench, "run_bench", one_fails)
    rc = main(["bench", "verifier", "--out", str(tmp_path), "--json", str(tmp_path / "b.json")])
    captured = capsys.readouterr()
    assert rc == 1 and "bench: 1 of 1 models failed: verifier" in captured.err
    assert "FAILED" in captured.out  # the table still says why
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["error"] == "onnx2tf crashed"
