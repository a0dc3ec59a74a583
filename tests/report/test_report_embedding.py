"""Embedding-route report: embedding cosine per artifact and what the export left out of int8."""

from __future__ import annotations

from toolchain.pipeline.stages import _outside
from toolchain.report import write_report


def _recovery_only(recovery: dict) -> dict:
    """A passed embedding run with no artifacts: the report's int8-recovery section alone."""
    return {"name": "m", "kind": "embedding", "recipe": {}, "recipe_hash": "0" * 64, "artifacts": [],
            "budgets": [], "parity": [], "failures": [], "passed": True, "int8_recovery": recovery}


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
    parity[0] |= {"score_shift": -0.00363, "score_noise": 0.0101, "gap_of": "cosine score"}
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "embedding cosine to float (mean / min)" in md and "cosine score shift / noise" in md
    assert "| -0.0036 / 0.0101 |" in md and "| n/a / n/a |" in md
    assert "| export/m_int8.pte | 62.80% | 64.50% | -1.7 | 0.9994 / 0.9974 | -0.0036 / 0.0101 | 99.00% |" in md
    assert "flips" not in md  # rows from before the flip columns render as they did
    parity[0] |= {"flips": 12, "expected_flips": 9.46, "allowed_flips": 6, "noise_budget": 0.00502}
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "flips: measured / expected / allowed | noise budget |" in md
    assert "| 99.00% | 12 / 9.5 / 6 | 0.005 |" in md and "| - / n/a / - | n/a |" in md
    parity[0] |= {"refit_accuracy": 61.9}
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| artifact accuracy (float's thresholds) | artifact accuracy (own thresholds) | drop (points) |" in md
    assert "| export/m_int8.pte | 62.80% | 64.50% | 61.90% | -1.7 |" in md
    assert "| `export/m_int8.pte` | executorch | int8 | 10 | abababababababab | prelu (float) x33 |" in md
    assert "| tflite | int8 | 10 | cdcdcdcdcdcdcdcd | PRELU (not XNNPACK) x33 |" in md
    assert "| efefefefefefefef | none |" in md


def test_report_shows_qat_sensitivity_and_fallback(tmp_path):
    layers = [{"layer": "head.3", "op": "linear", "cosine_mean": 0.9995, "cosine_min": 0.995, "gain_mean": 0.0025,
               "gain_min": 0.02},
              {"layer": "features.0.0", "op": "conv2d", "cosine_mean": 0.9972, "cosine_min": 0.976,
               "gain_mean": 0.0002, "gain_min": 0.001}]
    recovery = {"equalize": {"pairs": 33, "streams": 3, "channels": 7552, "scale_median": 1.73, "scale_max": 7.23},
                "qat": {"steps": 60, "batch": 16, "lr": 1e-5, "loss_first": 0.004, "loss_last": 0.002,
                        "fake_quant_cosine_before": 0.996, "fake_quant_cosine_after": 0.998},
                "sensitivity": {"all_int8": {"cosine_mean": 0.997, "cosine_min": 0.975}, "layers": layers,
                                "images": 64},
                "fallback": {"float_layers": ["head.3"], "met": True, "targets": {"min_cosine_mean": 0.999,
                                                                                  "min_cosine_min": None,
                                                                                  "max_int8_bytes": 2000000},
                             "trail": [{"layers": 0, "cosine_mean": 0.997, "cosine_min": 0.975},
                                       {"layers": 1, "cosine_mean": 0.9995, "cosine_min": 0.995}],
                             "latency": {"with_float_layers": 1.2, "all_int8": 1.0, "ratio": 1.2,
                                         "source": "ETDump Method::execute"}}}
    core = _recovery_only(recovery)
    written = write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## int8 accuracy recovery" in md and "QAT (PT2E fake quantisation" in md
    assert "equalization: 33 conv pairs and 3 residual streams, 7552 channels rescaled (median scale 1.73, largest 7.23)" in md
    assert "| `head.3` | linear | n/a | 0.9995 | 0.995 | +0.00250 |" in md
    assert "1 layer(s) kept in float: `head.3`." in md and "1.20 x" in md
    assert "Fallback (target cosine mean >= 0.999): 1 layer(s)" in md  # a size budget is no cosine target
    assert "![int8 sensitivity per layer](report_files/int8_sensitivity.png)" in md
    assert any(p.name == "int8_sensitivity.png" and p.stat().st_size > 1000 for p in written)


def test_report_fallback_that_missed_keeps_nothing_and_says_so(tmp_path):
    trail = [{"layers": n, "cosine_mean": 0.9988, "cosine_min": 0.997} for n in range(3)]
    recovery = {"fallback": {"float_layers": [], "met": False, "tried": ["a.0", "b.0"],
                             "targets": {"min_cosine_mean": 0.999}, "trail": trail}}
    core = _recovery_only(recovery)
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "no layer kept in float (2 tried did not reach it); the target was NOT met" in md
    assert "already meets" not in md


def test_report_names_the_calibration_images_left_out(tmp_path):
    recovery = {"calibration_outliers": {"factor": 8.0, "images": 64, "median_worst_ratio": 1.9,
                                         "left_out": [{"image": 42, "ratio": 642.1, "layer": "head.4"}]}}
    core = _recovery_only(recovery)
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Calibration outliers (activation peak above 8 x" in md
    assert "1 of 64 left out (image 42: 642.1 x at `head.4`)" in md


def test_report_says_the_tflite_had_its_own_int8_options(tmp_path):
    recovery = {"qat": {"steps": 200, "batch": 16, "lr": 1e-5, "loss_first": 0.004, "loss_last": 0.002,
                        "fake_quant_cosine_before": 0.996, "fake_quant_cosine_after": 0.998},
                "tflite": {"int8": {"calibration": "mse", "bias_correction": True, "equalize": True}}}
    core = _recovery_only(recovery)
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "QAT (PT2E fake quantisation" in md
    assert "The `.tflite` has its own int8 options (calibration mse, bias_correction True, equalize True); no QAT." in md


def test_report_block_fallback_names_blocks_and_what_each_step_added(tmp_path):
    layers = [{"layer": "features.2", "op": "block", "local_error": 1e-3, "cosine_mean": 0.9985, "cosine_min": 0.996,
               "gain_mean": 0.0004, "gain_min": 0.001}]
    trail = [{"layers": 0, "cosine_mean": 0.9981, "cosine_mean_low": 0.9979, "cosine_min": 0.995,
              "set_aside": [0.4768, 0.97, 0.9894]},
             {"layers": 1, "added": "features.2", "cosine_mean": 0.9985, "cosine_mean_low": 0.9983, "cosine_min": 0.996,
              "set_aside": [0.4801, 0.9712, 0.9899]}]
    recovery = {"sensitivity": {"all_int8": {"cosine_mean": 0.9981, "cosine_min": 0.995, "set_aside": [0.4768]},
                                "layers": layers, "images": 32, "measured": 1, "unit": "block"},
                "fallback": {"float_layers": [], "met": False, "tried": ["features.2"], "images": 128,
                             "ranking_images": 32, "targets": {"min_cosine_mean": 0.999}, "trail": trail}}
    write_report(_recovery_only(recovery), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Per-block sensitivity on 32 identity images, each with its mirror" in md
    assert "their lowest 1 cosines set aside" in md
    assert "| block | op |" in md and "| `features.2` | block |" in md
    assert "judged on the 128 measuring images with their mirrors, after setting aside the lowest 3 cosines" in md
    assert "ranked on 32 of them" in md
    assert "no block kept in float (1 tried did not reach it); the target was NOT met within the allowed blocks." in md
    assert "| 1 | `features.2` | 0.9985 | 0.9983 | 0.996 | 0.4801, 0.9712, 0.9899 |" in md
    # Short of the agreement target alone, the quietest choice stays (selection.quietest_short).
    recovery["fallback"].update(float_layers=["features.2"], closest=True)
    write_report(_recovery_only(recovery), tmp_path)
    assert ("1 block(s) kept in float: `features.2`; the target was NOT met within the allowed blocks; they are the "
            "quietest choice it judged, the cosine targets met and the score noise above the agreement target.") \
        in (tmp_path / "report.md").read_text()


def test_report_shows_the_tflite_fallback_its_trail_bytes_and_latency(tmp_path):
    trail = [{"layers": 0, "cosine_mean": 0.9987, "cosine_mean_low": 0.9986, "cosine_min": 0.995, "set_aside": [],
              "bytes": 1_697_000},
             {"layers": 1, "added": "features.1", "cosine_mean": 0.9991, "cosine_mean_low": 0.99905, "cosine_min": 0.996,
              "set_aside": [], "bytes": 1_712_000}]
    recovery = {"tflite_fallback": {"float_units": ["features.1"], "met": True, "tried": ["features.1"], "unit": "block",
                                    "targets": {"min_cosine_mean": 0.999, "min_cosine_min": None},
                                    "max_bytes": 1_983_616, "images": 32, "trail": trail,
                                    "latency": {"with_float_layers": 4.2, "all_int8": 3.5, "ratio": 1.2,
                                                "source": "LiteRT invoke()"}}}
    write_report(_recovery_only(recovery), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("`.tflite` fallback, measured in LiteRT (XNNPACK, one thread) on 32 identity images with their mirrors "
            "(target cosine mean >= 0.999, within 1,983,616 bytes): 1 block(s) kept in float: `features.1`.") in md
    assert "| 1 | `features.1` | 0.9991 | 0.99905 | 0.996 | - | 1,712,000 |" in md
    assert "4.2 ms with those blocks in float against 3.5 ms all int8 (1.20 x)" in md
    # The backward pass's tries (toolchain.quantize.selection.drop_unneeded) say what each found.
    tried = {"cosine_mean": 0.9987, "cosine_mean_low": 0.9986, "cosine_min": 0.995, "set_aside": [], "bytes": 1_697_000}
    write_report(_recovery_only({"tflite_fallback": {**recovery["tflite_fallback"], "trail": trail + [
        {"layers": 0, "removed": "features.1", "met": False, **tried}]}}), tmp_path)
    assert "| 0 | without `features.1`: still needed | 0.9987 |" in (tmp_path / "report.md").read_text()
    # The .pte's choice, judged after the greedy steps missed, is one row naming its units.
    trail.append({"layers": 2, "units": ["features.0", "features.1"], "source": "the .pte's choice",
                  "cosine_mean": 0.9992, "cosine_mean_low": 0.99915, "cosine_min": 0.996, "set_aside": [],
                  "bytes": 1_730_000})
    recovery["tflite_fallback"].update(float_units=["features.0", "features.1"], met=True, **{"from": ".pte"})
    write_report(_recovery_only(recovery), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("2 block(s) kept in float: `features.0`, `features.1` (the `.pte`'s choice: judged after its own steps "
            "missed the target).") in md
    assert "| 2 | the .pte's choice: `features.0`, `features.1` | 0.9992 | 0.99915 |" in md
    # ... or taken because it keeps fewer units than the greedy steps' choice, which met the target too.
    recovery["tflite_fallback"]["why"] = "fewer units"
    write_report(_recovery_only(recovery), tmp_path)
    assert ("(the `.pte`'s choice: it keeps fewer than its own steps' choice, which also met it)."
            in (tmp_path / "report.md").read_text())
    recovery["tflite_fallback"].update(float_units=["features.1"], met=False, closest=True)
    del recovery["tflite_fallback"]["from"]
    write_report(_recovery_only(recovery), tmp_path)
    assert ("1 block(s) kept in float: `features.1`; the target was NOT met; they are the quietest choice it judged"
            in (tmp_path / "report.md").read_text())
    recovery["tflite_fallback"] = {"float_units": [], "met": None, "unit": "layer", "error": "cannot tell which ops"}
    write_report(_recovery_only(recovery), tmp_path)
    assert "The `.tflite`'s fallback did not run: cannot tell which ops. The file is all int8." in \
        (tmp_path / "report.md").read_text()


def test_report_lists_the_int8_files_lowest_images(tmp_path):
    lowest = [{"pair": 901, "side": "b", "person": 261, "cosine": 0.98949}, {"pair": 12, "side": "a", "person": None,
                                                                             "cosine": 0.9905}]
    parity = [{"artifact": f"export/m_{p}.pte", "file": f"m_{p}.pte", "precision": p, "accuracy": 97.9,
               "float_accuracy": 97.9, "accuracy_drop": 0.0, "decision_agreement": 99.9, "latency_ms": 3.7,
               "float_latency_ms": 34.0, "passed": p == "fp32", "embedding_cosine_mean": 0.9991,
               "embedding_cosine_min": lowest[0]["cosine"] if p == "int8" else 0.99999,
               "embedding_cosine_lowest": lowest if p == "int8" else [dict(lowest[0], cosine=0.99999)]}
              for p in ("int8", "fp32")]
    core = {"name": "m", "kind": "embedding", "recipe": {}, "recipe_hash": "0" * 64, "artifacts": [],
            "budgets": [], "parity": parity, "failures": ["x"], "passed": False}
    write_report(core, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "- `m_int8.pte`: 0.9895 (pair 901 b, person 261), 0.9905 (pair 12 a)" in md
    assert "m_fp32.pte`:" not in md  # float files sit at 1.0; only int8 ones are listed


def test_report_shows_the_agreement_target_and_each_steps_score_noise(tmp_path):
    trail = [{"layers": 0, "cosine_mean": 0.99948, "cosine_mean_low": 0.99945, "cosine_min": 0.9985,
              "set_aside": [0.9983], "score_noise": 0.0061},
             {"layers": 1, "added": "features.1", "cosine_mean": 0.99956, "cosine_mean_low": 0.99953,
              "cosine_min": 0.9987, "set_aside": [0.9984], "score_noise": 0.0055}]
    aim = {"score_threshold": 0.786, "max_score_noise": 0.0058, "pairs": 6000, "allowed_flips": 30,
           "expected_flips": 22.4, "risk": 0.05}
    recovery = {"agreement_target": aim,
                "fallback": {"float_layers": ["features.1"], "met": True, "tried": ["features.1"], "images": 128,
                             "ranking_images": 32, "trail": trail,
                             "targets": {"min_cosine_mean": 0.999, "min_cosine_min": 0.99, "score_threshold": 0.786,
                                         "max_score_noise": 0.0058}}}
    write_report(_recovery_only(recovery), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "the float model's scores of the 6,000 pairs set the threshold 0.786" in md
    assert "Parity allows 30 flips; 22.4 expected exceed that 5% of the time" in md
    assert "score noise at most 0.00580 at the threshold" in md
    assert "target cosine mean >= 0.999, cosine min >= 0.99, score noise at 0.786 <= 0.00580" in md
    assert "| score noise at the threshold |" in md and "| 0.0055 |" in md


def test_report_sensitivity_table_shows_the_score_noise_when_there_is_an_agreement_target(tmp_path):
    layers = [{"layer": "features.1", "op": "block", "local_error": 1e-3, "cosine_mean": 0.99951, "cosine_min": 0.996,
               "gain_mean": 0.0001, "gain_min": 0.001, "score_noise": 0.00587, "gain_noise": 0.00053}]
    recovery = {"sensitivity": {"all_int8": {"cosine_mean": 0.99941, "cosine_min": 0.995, "score_noise": 0.0064},
                                "layers": layers, "images": 32, "measured": 1, "unit": "block"}}
    write_report(_recovery_only(recovery), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "is 0.0064 all int8 (while that target is the only one missed, the fallback ranks by the noise" in md
    assert "| score noise | noise removed |" in md
    assert "| `features.1` | block | 1.00e-03 | 0.99951 | 0.996 | +0.00010 | 0.00587 | +0.00053 |" in md


def test_report_marks_the_second_pass_by_gain_per_byte(tmp_path):
    row = {"cosine_mean_low": 0.999, "cosine_min": 0.996, "set_aside": []}
    trail = [{"layers": 0, "cosine_mean": 0.9985, **row, "bytes": 1_000_000},
             {"layers": 1, "added": "features.9", "cosine_mean": 0.9990, **row, "bytes": 1_052_000},
             {"layers": 1, "added": "features.2", "pass": "per byte", "cosine_mean": 0.9988, **row, "bytes": 1_005_000},
             {"layers": 2, "added": "features.3", "pass": "per byte", "cosine_mean": 0.9992, **row, "bytes": 1_010_000},
             {"layers": 1, "removed": "features.2", "met": False, "pass": "per byte", "cosine_mean": 0.9988, **row,
              "bytes": 1_005_000}]
    fb = {"float_units": ["features.2", "features.3"], "met": True, "tried": ["features.9"], "unit": "block",
          "targets": {"min_cosine_mean": 0.999}, "max_bytes": 1_060_000, "images": 128, "trail": trail,
          "per_byte": {"tried": ["features.2", "features.3"], "met": True}}
    write_report(_recovery_only({"tflite_fallback": fb}), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert ("The largest-gain steps (`features.9`) missed the target within the size budget, so a second pass "
            "started again from all int8") in md and "it met the target, and its choice is kept." in md
    assert "| 2 | `features.3` (per byte) | 0.9992 |" in md
    assert "| 1 | without `features.2` (per byte): still needed |" in md
    write_report(_recovery_only({"tflite_fallback": {**fb, "float_units": [], "met": False,
                                                     "per_byte": {"tried": ["features.2"], "met": False}}}), tmp_path)
    assert "(the rows marked per byte): it missed it too." in (tmp_path / "report.md").read_text()
