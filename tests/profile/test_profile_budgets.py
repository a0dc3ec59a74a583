"""`toolchain check --budgets`: exit 0 / 1 / 2, and the library API the pipeline calls."""

import json
import sys
import types
from pathlib import Path

import pytest

from toolchain.cli import main
from toolchain.errors import CheckFailed, ToolchainError
from toolchain.profile import (
    BudgetResult,
    check_budgets,
    evaluate_budgets,
    load_budgets,
    register_budget_key,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="budgets.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_check_passes_exit_0(tmp_path, capsys):
    f = write(tmp_path, "verifier:\n  max_params: 23000\n  max_macs: 2500000\n  max_flops: 5000000\n")
    assert main(["check", "--budgets", f]) == 0
    out = capsys.readouterr().out
    assert "verifier.max_params" in out and "pass" in out


def test_check_fails_exit_1_naming_the_budget(tmp_path, capsys):
    f = write(tmp_path, "verifier:\n  max_params: 100\n  max_macs: 2500000\n")
    assert main(["check", "--budgets", f, "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["passed"] is False
    rows = {r["name"]: r for r in report["results"]}
    assert rows["verifier.max_params"]["passed"] is False and rows["verifier.max_params"]["value"] == 17073
    assert rows["verifier.max_macs"]["passed"] is True
    assert "verifier.max_params" in captured.err


@pytest.mark.parametrize(
    "text, args, culprits",
    [
        ("verifier:\n  max_parms: 1\n", [], ["max_parms", "verifier"]),  # unknown budget key
        ("verifier:\n  max_params: [1\n", [], ["malformed YAML"]),
        ("no-such-model:\n  max_params: 1\n", [], ["no-such-model"]),  # unknown model in the file
        ("verifier:\n  max_params: 1\n", ["no-such-model"], ["no-such-model"]),  # unknown target
        ("verifier:\n  max_params: '1'\n", [], ["max_params", "number"]),
        ("verifier:\n  max_bytes: 1\n", [], ["max_bytes", "file"]),
        ("a:\n  file: gone.tflite\n  max_bytes: 1\n", [], ["gone.tflite"]),
        ("- verifier\n", [], ["mapping"]),
    ],
)
def test_check_bad_input_exit_2(tmp_path, capsys, text, args, culprits):
    f = write(tmp_path, text)
    assert main(["check", "--budgets", f, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for c in culprits:
        assert c in err


def test_check_missing_budgets_file_exit_2(tmp_path, capsys):
    assert main(["check", "--budgets", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_max_bytes_of_a_file_relative_to_the_budgets_file(tmp_path):
    (tmp_path / "m.pte").write_bytes(b"\x00" * 4 + b"ET12" + b"x" * 92)  # an ExecuTorch file identifier
    ok = check_budgets(load_budgets(write(tmp_path, "m:\n  file: m.pte\n  max_bytes: 100\n")))
    bad = check_budgets(load_budgets(write(tmp_path, "m:\n  file: m.pte\n  max_bytes: 99\n")))
    assert [(r.name, r.value, r.passed) for r in ok] == [("m.max_bytes", 100, True)]
    assert bad[0].passed is False


def test_evaluate_budgets_from_the_pipelines_measurements():
    budgets = load_budgets({
        "verifier": {"max_params": 23000, "max_latency_ms": 1.0, "min_decision_agreement": 0.99},
    })
    results = evaluate_budgets(budgets, {"verifier": {"params": 20865, "latency_ms": 1.5,
                                                      "decision_agreement": 0.995}})
    verdicts = {r.name: r.passed for r in results}
    assert verdicts == {"verifier.max_params": True, "verifier.max_latency_ms": False,
                        "verifier.min_decision_agreement": True}
    d = results[2].to_dict()
    assert {"name", "value", "limit", "passed"} <= set(d) and d["compare"] == ">="


def test_unmeasured_budget_fails_and_lower_bounds_do_not_pass():
    budgets = load_budgets({"m": {"max_macs": 100, "max_accuracy_drop": 0.01}})
    results = evaluate_budgets(budgets, {"m": {"macs": 10, "unsupported_ops": {"aten::cumsum": 1}}})
    assert [r.passed for r in results] == [False, False]
    assert "aten::cumsum" in results[0].note and results[1].value is None


def test_registered_key_becomes_valid():
    with pytest.raises(ToolchainError, match="max_peak_memory_mb"):
        load_budgets({"m": {"max_peak_memory_mb": 5}})
    register_budget_key("max_peak_memory_mb", "peak_memory_mb", "<=", "pipeline")
    r = evaluate_budgets({"m": {"max_peak_memory_mb": 5}}, {"m": {"peak_memory_mb": 4}})
    assert r == [BudgetResult("m.max_peak_memory_mb", 4, 5, True, "<=", "peak_memory_mb")]


def test_check_run_dir_uses_the_pipeline_verifier(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("toolchain.pipeline.verify")
    rows = [BudgetResult("verifier.max_params", 20865, 23000, True)]
    fake.check_run_dir = lambda path: rows
    monkeypatch.setitem(sys.modules, "toolchain.pipeline.verify", fake)
    assert main(["check", str(tmp_path)]) == 0
    assert "verifier.max_params" in capsys.readouterr().out

    def failing(path):
        exc = CheckFailed("1 check failed: sha256")
        exc.rows = [{"name": "file a.pte sha256", "value": None, "limit": None, "passed": False}]
        raise exc

    fake.check_run_dir = failing
    assert main(["check", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "file a.pte sha256" in captured.out and "sha256" in captured.err


def test_check_run_dir_without_the_pipeline_module(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "toolchain.pipeline.verify", None)  # import fails
    assert main(["check", str(tmp_path)]) == 2
    assert "toolchain.pipeline.verify" in capsys.readouterr().err


@pytest.mark.slow
def test_ci_budgets_file_holds_for_the_zoo(capsys):
    assert main(["check", "--budgets", str(REPO / "ci" / "budgets.yaml")]) == 0
    out = capsys.readouterr().out
    assert "verifier.max_flops" in out and "FAIL" not in out
