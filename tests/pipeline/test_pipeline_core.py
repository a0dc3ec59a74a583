"""The stage runner with stand-in stages: caching, invalidation, resume, manifest, check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolchain.errors import CheckFailed, ToolchainError
from toolchain.pipeline import Stage, StageOutput, check_run_dir, run_recipe
from toolchain.recipe import validate_recipe

CALLS: list[str] = []
FAIL_IN: set[str] = set()


def _recipe(**over):
    raw = {"name": "standin", "kind": "embedding", "export": {"model": "mobilefacenet"},
           "budgets": {"max_int8_bytes": 100, "max_params": 1000},
           "parity": {"max_accuracy_drop": 0.3, "min_decision_agreement": 99.0}}
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return validate_recipe(raw)


def _stages() -> list[Stage]:
    def data(ctx):
        CALLS.append("data")
        p = ctx.path("data/images.txt")
        p.write_text(f"seed={ctx.recipe.data.synthetic.seed}\n")
        return StageOutput(files=[p], data={"train": ctx.rel(p)})

    def train(ctx):
        CALLS.append("train")
        wd = ctx.path("train")
        ckpt = wd / "ckpt.txt"
        step = int(ckpt.read_text()) if ckpt.exists() else 0  # resume from the "checkpoint"
        ckpt.write_text(str(step + 1))
        if "train" in FAIL_IN:
            FAIL_IN.discard("train")
            raise RuntimeError("interrupted")
        final = wd / "final.txt"
        final.write_text(ctx.path(ctx.results["data"]["train"]).read_text() + f"steps={step + 1}\n")
        return StageOutput(files=[final], data={"checkpoint": ctx.rel(final), "resumed_from": step})

    def export(ctx):
        CALLS.append("export")
        import hashlib

        from toolchain.pipeline import sha256_file

        art = ctx.path("export/model_int8.bin")
        ckpt = ctx.path(ctx.results["train"]["checkpoint"]).read_bytes()
        art.write_bytes(hashlib.sha256(ckpt).digest() + b"\x00" * 8)  # 40 bytes, depends on training

        return StageOutput(files=[art], data={"artifacts": [
            {"path": ctx.rel(art), "format": "tflite", "precision": "int8", "bytes": 40,
             "sha256": sha256_file(art)}]})

    def profile(ctx):
        CALLS.append("profile")
        art = ctx.results["export"]["artifacts"][0]
        return StageOutput(data={"profile": {"params": 500}, "budgets": [
            {"name": "params", "value": 500, "limit": 1000, "passed": True},
            {"name": f"bytes {art['path']}", "value": art["bytes"], "limit": 100,
             "passed": art["bytes"] <= 100, "artifact": art["path"], "metric": "bytes"}]})

    def parity(ctx):
        CALLS.append("parity")
        scores = ctx.path("parity/scores.json")
        scores.parent.mkdir(parents=True, exist_ok=True)
        scores.write_text(json.dumps({"export/model_int8.bin": {
            "labels": [0, 1, 0, 1], "float": [0.1, 0.9, 0.2, 0.8], "artifact": [0.12, 0.88, 0.25, 0.79]}}))
        return StageOutput(files=[scores], data={"scores": ctx.rel(scores), "rows": [
            {"artifact": "export/model_int8.bin", "accuracy": 100.0, "float_accuracy": 100.0,
             "accuracy_drop": 0.0, "decision_agreement": 100.0, "latency_ms": 0.1, "passed": True}]})

    return [
        Stage("data", data, config=lambda ctx: ctx.recipe.data.model_dump(), workdir="data"),
        Stage("train", train, after=("data",), config=lambda ctx: ctx.recipe.seed, workdir="train"),
        Stage("export", export, after=("train",), config=lambda ctx: ctx.recipe.export.model_dump(),
              workdir="export"),
        Stage("profile", profile, after=("export",), config=lambda ctx: ctx.recipe.budgets.model_dump()),
        Stage("parity", parity, after=("export",), config=lambda ctx: ctx.recipe.parity.model_dump(),
              workdir="parity"),
    ]


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    FAIL_IN.clear()


def _run(recipe, out):
    return run_recipe(recipe, out, stages=_stages())


def test_first_run_writes_manifest_and_report(tmp_path):
    res = _run(_recipe(), tmp_path / "run")
    assert res.passed
    assert CALLS == ["data", "train", "export", "profile", "parity"]
    m = json.loads(res.manifest.read_text())
    for key in ("artifacts", "budgets", "parity", "evaluation", "versions", "timings", "recipe", "recipe_hash"):
        assert key in m
    assert m["artifacts"][0]["path"] == "export/model_int8.bin"
    assert m["versions"]["torch"]
    assert set(m["timings"]) == {"data", "train", "export", "profile", "parity", "report"}
    assert res.report_md.is_file() and res.report_html.is_file()
    assert (tmp_path / "run" / "report_files" / "roc.png").is_file()
    assert all(s["status"] == "ran" for s in m["stages"])


def test_relative_out_dir(tmp_path, monkeypatch):
    """`--out artifacts/demo` (relative, as `make demo` passes it) must not nest the folder twice."""
    monkeypatch.chdir(tmp_path)
    res = _run(_recipe(), Path("artifacts") / "demo")
    assert res.passed and (tmp_path / "artifacts" / "demo" / "manifest.json").is_file()
    assert not (tmp_path / "artifacts" / "demo" / "artifacts").exists()
    CALLS.clear()
    _run(_recipe(), Path("artifacts") / "demo")
    assert CALLS == []


def test_second_run_skips_everything(tmp_path):
    out = tmp_path / "run"
    _run(_recipe(), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    CALLS.clear()
    res = _run(_recipe(), out)
    assert CALLS == []
    assert [s.status for s in res.stages] == ["skipped"] * 6
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert before == after
    m = json.loads(res.manifest.read_text())
    assert all(s["status"] == "skipped" for s in m["stages"])


def test_config_change_reruns_only_downstream(tmp_path):
    out = tmp_path / "run"
    _run(_recipe(), out)
    CALLS.clear()
    res = _run(_recipe(data={"synthetic": {"seed": 7}}), out)
    assert CALLS == ["data", "train", "export", "profile", "parity"]
    CALLS.clear()
    res = _run(_recipe(data={"synthetic": {"seed": 7}}, parity={"latency_runs": 3}), out)
    assert CALLS == ["parity"]
    assert {s.name: s.status for s in res.stages}["report"] == "ran"  # the recipe it shows changed


def test_tampered_output_is_redone(tmp_path):
    out = tmp_path / "run"
    _run(_recipe(), out)
    (out / "train" / "final.txt").write_text("tampered")
    CALLS.clear()
    _run(_recipe(), out)
    assert CALLS[0] == "train"
    assert "data" not in CALLS


def test_interrupted_run_resumes(tmp_path):
    out = tmp_path / "run"
    FAIL_IN.add("train")
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(_recipe(), out)
    assert not (out / "manifest.json").exists()
    CALLS.clear()
    res = _run(_recipe(), out)
    status = {s.name: s.status for s in res.stages}
    assert status["data"] == "skipped" and status["train"] == "ran"
    # the work folder of the interrupted stage was kept: training went on from its checkpoint
    rec = json.loads((out / ".stages" / "train.json").read_text())
    assert rec["data"]["resumed_from"] == 1
    assert res.passed and (out / "report.md").is_file()


def test_interrupted_then_changed_config_starts_clean(tmp_path):
    out = tmp_path / "run"
    FAIL_IN.add("train")
    with pytest.raises(RuntimeError):
        _run(_recipe(), out)
    res = _run(validate_recipe({**_recipe().resolved(), "seed": 3}), out)
    rec = json.loads((out / ".stages" / "train.json").read_text())
    assert rec["data"]["resumed_from"] == 0  # checkpoint of the other config was not resumed
    assert res.passed


def test_failed_budget_marks_run_failed(tmp_path):
    # the stand-in profile stage has a fixed 100-byte limit; make the artifact too big
    stages = _stages()

    def big_export(ctx):
        art = ctx.path("export/model_int8.bin")
        art.write_bytes(b"\x01" * 400)
        from toolchain.pipeline import sha256_file

        return StageOutput(files=[art], data={"artifacts": [
            {"path": ctx.rel(art), "format": "tflite", "precision": "int8", "bytes": 400,
             "sha256": sha256_file(art)}]})

    stages[2] = Stage("export", big_export, after=("train",), workdir="export")
    res = run_recipe(_recipe(), tmp_path / "run", stages=stages)
    assert not res.passed
    assert any("budget" in f for f in res.failures)
    assert "FAIL" in res.report_md.read_text()
    with pytest.raises(CheckFailed):
        check_run_dir(tmp_path / "run")


def test_check_run_dir(tmp_path):
    out = tmp_path / "run"
    _run(_recipe(), out)
    rows = check_run_dir(out)
    assert rows and all(r.passed for r in rows)
    assert any(r.name.startswith("budget") for r in rows)
    art = out / "export" / "model_int8.bin"
    data = bytearray(art.read_bytes())
    data[3] ^= 0xFF
    art.write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="sha256") as info:
        check_run_dir(out)
    assert info.value.exit_code == 1
    assert any(not r.passed for r in info.value.rows)
    (out / "manifest.json").unlink()
    with pytest.raises(ToolchainError) as info2:
        check_run_dir(out)
    assert info2.value.exit_code == 2 and not isinstance(info2.value, CheckFailed)


def test_check_run_dir_malformed(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ToolchainError, match="malformed"):
        check_run_dir(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": [{"path": "x"}], "budgets": []}))
    with pytest.raises(ToolchainError, match=r"artifacts\[0\]"):
        check_run_dir(tmp_path)


def test_missing_artifact_fails_check(tmp_path):
    out = tmp_path / "run"
    _run(_recipe(), out)
    (out / "export" / "model_int8.bin").unlink()
    with pytest.raises(CheckFailed, match="present"):
        check_run_dir(out)


def test_resolved_paths_are_relative(tmp_path):
    out = tmp_path / "run"
    res = _run(_recipe(), out)
    m = json.loads(res.manifest.read_text())
    assert not Path(m["artifacts"][0]["path"]).is_absolute()
    assert str(tmp_path) not in json.dumps(m["artifacts"])


def test_fleet_export_only_with_the_default_int8_method():
    """The fleet's templates use the default int8 method; other settings export each user in full."""
    from types import SimpleNamespace

    from toolchain.pipeline.stages import _fleet_export

    import yaml

    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "verifier.yaml").read_text())
    base["export"]["users"] = None
    assert _fleet_export(SimpleNamespace(recipe=validate_recipe(base)))
    for int8 in ({"bias_correction": True}, {"calibration": "minmax"}):
        recipe = validate_recipe({**base, "export": {**base["export"], "int8": int8}})
        assert not _fleet_export(SimpleNamespace(recipe=recipe))
