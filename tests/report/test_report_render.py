"""The run report from stand-in manifest data: tables, verdicts, plots."""

from __future__ import annotations

import numpy as np
from PIL import Image

from toolchain.report import write_report
from toolchain.report import plots


def _core(passed_budget: bool = True) -> dict:
    arts = [{"path": "export/user_000/verifier_int8.tflite", "format": "tflite", "precision": "int8",
             "bytes": 31000, "sha256": "ab" * 32, "user": "user_000"},
            {"path": "export/user_000/verifier_fp32.pte", "format": "executorch", "precision": "fp32",
             "bytes": 90000, "sha256": "cd" * 32, "user": "user_000"}]
    budgets = [{"name": "verifier.max_params", "value": 20865, "limit": 23000, "passed": True},
               {"name": "export/user_000/verifier_int8.tflite.max_bytes", "value": 31000 if passed_budget else 41000,
                "limit": 40000, "passed": passed_budget}]
    parity = [{"artifact": a["path"], "accuracy": 95.1, "float_accuracy": 95.2, "accuracy_drop": 0.1,
               "decision_agreement": 99.8, "latency_ms": 0.12, "float_latency_ms": 0.9, "passed": True}
              for a in arts]
    core = {"name": "standin", "kind": "verifier", "recipe": {"parity": {"max_accuracy_drop": 0.3,
                                                                        "min_decision_agreement": 99.5}},
            "recipe_hash": "f" * 64, "artifacts": arts, "budgets": budgets, "parity": parity,
            "evaluation": {"per_user": {"accuracy": 0.93, "accuracy_std": 0.01, "pairs": 600,
                                        "tar_at_far": {"1e-3": 0.5}, "auc": 0.97},
                           "backbone": {"accuracy": 0.95, "accuracy_std": 0.012, "pairs": 600}},
            "users": [{"user": "user_000", "threshold": 0.1, "accuracy": 0.97, "tar": 0.9, "far": 0.02, "probes": 80},
                      {"user": "user_001", "threshold": -0.2, "accuracy": 0.95, "tar": 0.85, "far": 0.03, "probes": 80}],
            "comparison": [
                {"model": "verifier (per-user route)", "params": 20865, "macs": 1792640, "int8_bytes": 31000,
                 "latency_ms": 0.12, "accuracy": 0.93},
                {"model": "mobilefacenet", "params": 1200512, "macs": 221161984, "int8_bytes": None,
                 "latency_ms": None, "accuracy": 0.95}],
            "versions": {"torch": "2.13.0", "onnx2tf": None}, "timings": {"data": 1.5, "train_backbone": 60.0}}
    core["failures"] = [] if passed_budget else ["budget x: 41000 > 40000"]
    core["passed"] = passed_budget
    return core


def _scores() -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    f = labels * 2.0 + rng.normal(0, 1, 200)
    return {"export/user_000/verifier_int8.tflite": {"labels": labels.tolist(), "float": f.tolist(),
                                                      "artifact": (f + rng.normal(0, 0.05, 200)).tolist(),
                                                      "source": "user_000"},
            "export/user_000/verifier_fp32.pte": {"labels": labels.tolist(), "float": f.tolist(),
                                                   "artifact": f.tolist(), "source": "user_000"}}


def test_report_tables_and_plots(tmp_path):
    written = write_report(_core(), tmp_path, _scores())
    names = {p.name for p in written}
    assert {"report.md", "report.html", "budgets.png", "parity_scatter.png", "roc.png"} <= names
    for p in written:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.size[0] > 100 and im.size[1] > 100
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: PASSED**" in md
    assert "| verifier.max_params | 20,865 | 23,000 | PASS |" in md
    assert "| export/user_000/verifier_int8.tflite | 95.20% | 95.10% | 0.1 | 99.80% | 0.12 | 0.9 | PASS |" in md
    assert "| user_000 | 0.1 | 97.00% | 90.00% | 2.00% | 80 | verifier_int8.tflite, verifier_fp32.pte |" in md
    # backbone rows: profile counts always; never an invented size or latency
    assert "| mobilefacenet | 1.20M | 221.16M | not exported | not exported | 95.00% |" in md
    assert "| per-user route (hypernetwork + f) | 93.00% | 1 | 50.00% | 0.97 | 600 |" in md
    assert "](report_files/roc.png)" in md and "](report_files/budgets.png)" in md
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and 'src="report_files/parity_scatter.png"' in html


def test_report_failed_verdict_and_no_scores(tmp_path):
    written = write_report(_core(passed_budget=False), tmp_path, None)
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict: FAILED**" in md and "- budget x: 41000 > 40000" in md
    assert "| FAIL |" in md
    assert not any(p.name == "roc.png" for p in written)  # no scores, no ROC drawn from nothing


def test_budget_bars_colours(tmp_path):
    p = plots.budget_bars([{"name": "a", "value": 5, "limit": 10, "passed": True},
                           {"name": "b", "value": 15, "limit": 10, "passed": False}], tmp_path / "b.png")
    with Image.open(p) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    red = ((px[:, 0] > 180) & (px[:, 1] < 80) & (px[:, 2] < 80)).sum()
    green = ((px[:, 1] > 100) & (px[:, 0] < 80) & (px[:, 2] < 80)).sum()
    assert red > 100 and green > 100  # one failing (red) and one passing (green) bar
