"""Embedding-route report: embedding cosine per artifact and what the export left out of int8."""

from __future__ import annotations

from toolchain.pipeline.stages import _outside
from toolchain.report import write_report


def test_embedding_report_shows_cosine_and_outside(tmp_path):
    checks_pte = {"delegation": {"ops_outside": {}, "float_ops": {"prelu": 33}, "float_prefix_ops": {}}}
    checks_tfl = {"tflite": {"is_int8": True, "xnnpack_unsupported": {"PRELU": 33}, "problems": []}}
    arts = [{"path": "export/m_int8.pte", "format": "executorch", "precision": "int8", "bytes": 10,
             "sha256": "ab" * 32, "outside": _outside(checks_pte)},
            {"path": "export/m_int8.tflite", "format": "tflite", "precision": "int8", "bytes": 10,
             "sha256": "cd" * 32, "outside": _outside(checks_tfl)},
            {"path": "export/m_fp32.tflite", "format": "tflite", "precision": "fp32", "bytes": 40, "sha256": "ef" * 32,
             "outside": _outside({"tflite": {"is_int8": False, "xnnpack_unsupported": {"PRELU": 33}}})}]
    parity = [{"artifact": a["path"], "accuracy": 64.5, "float_accuracy": 62.8, "accuracy_drop": -1.7,
               "decision_agreement": 99.0, "latency_ms": 7.7, "float_latency_ms": 14.8, "passed": False,
               "embedding_cosine_mean": 0.99943, "embedding_cosine_min": 0.99738} for a in arts]
    core = {"name": "m", "kind": "embedding", "recipe": {}, "recipe_hash": "0" * 64, "artifacts": arts,
            "budgets": [], "parity": parity, "failures": ["x"], "passed": False}
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "embedding cosine to float (mean / min)" in md
    assert "| export/m_int8.pte | 62.80% | 64.50% | -1.7 | 0.9994 / 0.9974 | 99.00% |" in md
    assert "| `export/m_int8.pte` | executorch | int8 | 10 | abababababababab | prelu (float) x33 |" in md
    assert "| tflite | int8 | 10 | cdcdcdcdcdcdcdcd | PRELU (not XNNPACK) x33 |" in md
    assert "| efefefefefefefef | none |" in md
