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
               "--pairs", "20", "--calibration-size", "8", "--tflite-backend", backend, "--json", str(tmp_path / "bench.json")])
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
