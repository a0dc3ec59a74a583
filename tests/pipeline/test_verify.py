"""`toolchain check RUN_DIR` on manifests it cannot trust: one line and exit 2, never exit 0
on a manifest with nothing in it, and never an internal error on a value of the wrong type."""

import json

import pytest

from toolchain.cli import main
from toolchain.errors import ToolchainError
from toolchain.pipeline.verify import check_run_dir

BUDGET = {"name": "m.max_params", "value": 10, "limit": 20, "passed": True}


def _run(tmp_path, manifest) -> str:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps(manifest))
    return str(run)


def test_a_manifest_that_lists_nothing_is_not_a_pass(tmp_path, capsys):
    run = _run(tmp_path, {"artifacts": [], "budgets": []})
    assert main(["check", run]) == 2
    assert "nothing to verify" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", [
    {"artifacts": [], "budgets": [{**BUDGET, "value": "abc"}]},
    {"artifacts": [{"path": 5, "bytes": 1, "sha256": "0"}], "budgets": []},
    {"artifacts": [], "budgets": [BUDGET], "recipe": []},
    {"artifacts": [], "budgets": [BUDGET], "parity": [1]},
    {"artifacts": [], "budgets": [{**BUDGET, "value": "abc", "limit": "abd"}]},  # compared as text: passed
    {"artifacts": [], "budgets": [{**BUDGET, "passed": "no"}]},  # a non-empty string: passed
    {"artifacts": [{"path": "../elsewhere", "bytes": 1, "sha256": "0"}], "budgets": []},  # read outside the run
])
def test_values_of_the_wrong_type_are_a_malformed_manifest(tmp_path, manifest):
    with pytest.raises(ToolchainError, match="malformed manifest"):
        check_run_dir(_run(tmp_path, manifest))


def test_a_well_formed_budget_still_checks(tmp_path):
    rows = check_run_dir(_run(tmp_path, {"artifacts": [], "budgets": [BUDGET]}))
    assert [(r.name, r.passed) for r in rows] == [("budget m.max_params", True)]


def test_a_missing_run_folder_is_named(tmp_path, capsys):
    """It got the generic usage message, as if a model name had come without --budgets."""
    assert main(["check", str(tmp_path / "no-run")]) == 2
    assert "no-run: no such run folder" in capsys.readouterr().err
