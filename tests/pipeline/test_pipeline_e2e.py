"""The real stages end to end on a tiny recipe: run, cached rerun, resume, check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolchain.cli import main
from toolchain.errors import CheckFailed, ToolchainError
from toolchain.pipeline import check_run_dir

TINY = Path(__file__).with_name("tiny.yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    rc = main(["run", str(TINY), "--out", str(out)])
    assert rc == 0, "tiny recipe should pass its (loose) bounds"
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name not in ("manifest.json", "run.log")}


def test_run_writes_everything(run_dir):
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [(a["format"], a["precision"]) for a in m["artifacts"]] == [("executorch", "int8")]
    for a in m["artifacts"]:
        assert (run_dir / a["path"]).is_file() and len(a["sha256"]) == 64 and a["bytes"] > 0
    names = {b["name"] for b in m["budgets"]}
    assert any(n.endswith("max_params") for n in names) and any(n.endswith("max_bytes") for n in names)
    assert len(m["parity"]) == len(m["artifacts"])
    for p in m["parity"]:
        assert {"artifact", "accuracy", "float_accuracy", "decision_agreement", "latency_ms"} <= set(p)
    ev = m["evaluation"]
    assert 0 <= ev["per_user"]["accuracy"] <= 1 and 0 <= ev["backbone"]["accuracy"] <= 1
    assert m["versions"]["torch"] and m["versions"]["toolchain"]
    assert set(m["timings"]) >= {"data", "train_backbone", "train_hypernet", "enroll", "evaluate", "export",
                                 "profile", "parity", "report"}
    assert len(m["recipe_hash"]) == 64 and m["recipe"]["name"] == "tiny"
    md = (run_dir / "report.md").read_text()
    for section in ("## Budgets", "## Parity", "## Enrolled users", "## Per-user route against the backbones"):
        assert section in md
    for png in ("budgets.png", "parity_scatter.png", "roc.png"):
        assert (run_dir / "report_files" / png).is_file()
    assert check_run_dir(run_dir)
    # The machine is recorded; the latencies name the CPU they were measured on.
    assert m["environment"]["cpu"]["model"] and m["latency_cpu"]["model"] == m["environment"]["cpu"]["model"]
    assert m["latency_cpu"]["model"] in md
    # The libraries' own output went to the run's log.
    assert (run_dir / "run.log").is_file() and (run_dir / "run.log").stat().st_size > 0


def test_second_run_does_no_work(run_dir):
    before = _files(run_dir)
    assert main(["run", str(TINY), "--out", str(run_dir)]) == 0
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["skipped"] * len(m["stages"])
    assert _files(run_dir) == before


def test_check_detects_tampering(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    art = copy / json.loads((copy / "manifest.json").read_text())["artifacts"][0]["path"]
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01
    art.write_bytes(bytes(data))
    with pytest.raises(CheckFailed):
        check_run_dir(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ToolchainError) as info:
        check_run_dir(copy)
    assert info.value.exit_code == 2


def test_interrupted_run_resumes(run_dir, tmp_path, monkeypatch):
    import shutil

    import toolchain.pipeline.stages as stages

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)  # a finished run; the override below invalidates export onwards
    override = "export.calibration_images=6"
    real = stages._stage_export

    def boom(ctx):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during export

    monkeypatch.setattr(stages, "_stage_export", boom)
    assert main(["run", str(TINY), "--out", str(out), override]) == 130
    monkeypatch.setattr(stages, "_stage_export", real)
    assert main(["run", str(TINY), "--out", str(out), override]) == 0
    m = json.loads((out / "manifest.json").read_text())
    status = {s["name"]: s["status"] for s in m["stages"]}
    assert all(status[s] == "skipped" for s in ("data", "train_backbone", "train_hypernet", "enroll", "evaluate"))
    assert status["export"] == "ran" and status["report"] == "ran"
    assert m["recipe"]["export"]["calibration_images"] == 6
    assert check_run_dir(out)


def test_several_users_export_through_the_fleet_path(run_dir, tmp_path):
    """export.users > 1: the recipe writes the users' files from templates (toolchain.fleet)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)  # data and training are reused; enrollment onward reruns
    assert main(["run", str(TINY), "--out", str(out), "enroll.users=2", "export.users=null"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    users = {a["user"] for a in m["artifacts"]}
    assert len(users) == 2 and all(a["mode"] == "patched" for a in m["artifacts"])
    assert (out / "export" / "fleet_manifest.json").is_file()
    assert {p["artifact"] for p in m["parity"]} == {a["path"] for a in m["artifacts"]}
