"""toolchain.report.seeds: several seeds of one recipe as mean ± std; the plot; the bench's refusals."""

import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.errors import ToolchainError
from toolchain.report.plots import seed_agreement
from toolchain.report.seeds import mean_std, seed_table, summarize_seeds

ROOT = Path(__file__).resolve().parents[2]


def _manifest(agreements: dict, float_accuracy: float, passed: bool, name: str = "mobilefacenet") -> dict:
    rows = [{"file": f, "decision_agreement": a, "num": 1200, "float_accuracy": float_accuracy,
             "accuracy_drop": 0.1, "tar_drop": None, "embedding_cosine_mean": 0.999,
             "embedding_cosine_min": 0.99, "score_shift": -0.001, "score_noise": 0.0075,
             "passed": a >= 99.5} for f, a in agreements.items()]
    return {"name": name, "passed": passed, "parity": rows}


def test_summary_gives_each_seed_and_mean_std():
    runs = {0: _manifest({"m_int8.pte": 99.5, "m_int8.tflite": 99.0}, 79.0, False),
            2: _manifest({"m_int8.pte": 99.25, "m_int8.tflite": 99.75}, 81.0, False)}
    s = summarize_seeds(runs)
    assert s["seeds"] == [0, 2] and s["passed"] == [False, False]
    assert s["float_accuracy"]["mean"] == pytest.approx(80.0)
    assert s["float_accuracy"]["std"] == pytest.approx(2 ** 0.5)  # sample std of 79 and 81
    pte = s["artifacts"]["m_int8.pte"]
    assert pte["flips"]["values"] == [6, 9]  # 0.5% and 0.75% of 1,200 decisions
    assert pte["passed"] == [True, False]
    assert s["artifacts"]["m_int8.tflite"]["agreement"]["mean"] == pytest.approx(99.375)
    assert pte["tar_drop"] == {"values": [None, None], "mean": None, "std": None}
    assert mean_std(pte["agreement"]) == "99.38 ± 0.18"
    assert mean_std(s["float_accuracy"], 1) == "80.0 ± 1.4"


def test_a_seeds_mixed_file_lines_up_with_the_others_all_int8_one():
    runs = {0: _manifest({"m_int8.pte": 99.5, "m_int8_mixed.tflite": 99.0}, 79.0, False),
            1: _manifest({"m_int8_mixed.pte": 99.75, "m_int8_mixed.tflite": 99.75}, 79.0, True)}
    s = summarize_seeds(runs)
    assert list(s["artifacts"]) == ["m_int8[_mixed].pte", "m_int8_mixed.tflite"]
    pte = s["artifacts"]["m_int8[_mixed].pte"]
    assert pte["files"] == ["m_int8.pte", "m_int8_mixed.pte"] and pte["passed"] == [True, True]
    assert pte["agreement"]["mean"] == pytest.approx(99.625)


def test_one_seed_has_no_std_and_a_missing_artifact_is_none():
    one = summarize_seeds({0: _manifest({"a.pte": 99.0}, 70.0, False)})
    assert one["float_accuracy"]["std"] is None and mean_std(one["float_accuracy"]) == "70.00"
    two = summarize_seeds({0: _manifest({"a.pte": 99.0}, 70.0, False),
                           1: _manifest({"a.pte": 99.0, "b.tflite": 100.0}, 72.0, True)})
    assert two["artifacts"]["b.tflite"]["agreement"]["values"] == [None, 100.0]
    assert two["artifacts"]["b.tflite"]["agreement"]["mean"] == 100.0


def test_refuses_mixed_recipes_and_runs_without_parity():
    with pytest.raises(ToolchainError, match="different recipes"):
        summarize_seeds({0: _manifest({"a.pte": 99.0}, 70, False), 1: _manifest({"a.pte": 99.0}, 70, False, "other")})
    with pytest.raises(ToolchainError, match="no parity rows"):
        summarize_seeds({0: {"name": "x", "passed": True, "parity": []}})
    with pytest.raises(ToolchainError, match="no runs"):
        summarize_seeds({})


def test_table_shows_each_seed_and_the_mean():
    from rich.console import Console

    s = summarize_seeds({0: _manifest({"a.pte": 99.0}, 70.0, False), 1: _manifest({"a.pte": 99.75}, 72.0, True)})
    s |= {"cpu": "Some CPU (x86_64; AVX2)", "exit_codes": {0: 1, 1: 0}}
    console = Console(record=True, width=200)
    console.print(seed_table(s))
    text = console.export_text()
    assert "Some CPU" in text and "99.00 (12)" in text and "99.75 (3)" in text
    assert "99.38 ± 0.53 (7.5 ± 6.4)" in text and "1/2 passed" in text and "1/2 pass" in text
    assert "-0.0010 / 0.0075" in text and "-0.0010 ± 0.0000 / 0.0075 ± 0.0000" in text


def test_each_seed_names_the_person_of_its_lowest_image():
    from rich.console import Console

    runs = {0: _manifest({"a.pte": 99.0}, 70.0, True), 1: _manifest({"a.pte": 99.75}, 72.0, True)}
    runs[0]["parity"][0]["embedding_cosine_lowest"] = [{"pair": 3, "side": "b", "person": 261, "cosine": 0.99}]
    s = summarize_seeds(runs)
    assert s["artifacts"]["a.pte"]["lowest_person"] == [261, None]
    console = Console(record=True, width=200)
    console.print(seed_table(s))
    text = console.export_text()
    assert "0.9990 / 0.9900 (261)" in text and text.count("(261)") == 1


def test_table_keeps_file_names_whole_at_the_bench_width():
    from rich.console import Console

    names = {"vargfacenet_int8.pte": 99.5, "vargfacenet_int8.tflite": 99.0}
    s = summarize_seeds({0: _manifest(names, 65.5, False), 1: _manifest(names, 68.75, False)})
    console = Console(record=True, width=190)  # the bench's width
    console.print(seed_table(s))
    text = console.export_text()
    assert "vargfacenet_int8.pte" in text and "vargfacenet_int8.tflite" in text


def test_seed_plot_is_written(tmp_path):
    s = summarize_seeds({0: _manifest({"a.pte": 99.0}, 70.0, False), 1: _manifest({"a.pte": 99.8}, 71.0, True)})
    path = seed_agreement(s, 99.5, tmp_path / "seeds.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [(["seed=3"], "drop the seed overrides"),
                                           (["train.backbone.seed=3"], "drop the seed overrides"),
                                           (["--seeds", "1", "1"], "repeats a seed"),
                                           (["export.int8.calibration=nope"], "calibration")])
def test_bench_refuses_seed_overrides_and_bad_recipes(args, message, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_recipe_seeds.py"),
                          str(ROOT / "recipes" / "mobilefacenet.yaml"), "--out", str(tmp_path), *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stdout and "Traceback" not in run.stderr
    assert not list(tmp_path.iterdir())  # nothing was run
