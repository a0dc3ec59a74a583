"""`toolchain doctor`: passes here, and fails clearly when a runtime cannot be imported."""

import sys

from toolchain.cli import main
from toolchain.doctor import Check, check_disk, check_versions, passed


def test_versions_match_the_pins():
    rows = {c.name: c for c in check_versions()}
    assert rows["python"].status == "ok"
    for dist in ("torch", "executorch", "torchao", "tensorflow-cpu", "ai-edge-litert", "onnx2tf"):
        assert rows[dist].status == "ok", rows[dist]


def test_a_wrong_pin_fails_with_a_fix(monkeypatch):
    import toolchain.doctor as doctor

    monkeypatch.setattr(doctor, "installed_version", lambda dist: "0.0.1" if dist == "executorch" else "9")
    monkeypatch.setattr(doctor, "pinned_versions", lambda: {"executorch": "1.5.1"})
    row = next(c for c in doctor.check_versions() if c.name == "executorch")
    assert row.status == "fail" and "pinned 1.5.1" in row.found and "make install" in row.fix


def test_unimportable_runtimes_fail_the_doctor(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    rc = main(["doctor", "--artifacts", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 1
    assert "ExecuTorch + XNNPACK runs a .pte" in out.err and "LiteRT" in out.err
    table = " ".join(out.out.split())
    assert "cannot import executorch.runtime" in table and "cannot import ai_edge_litert.interpreter" in table
    assert "make install" in table


def test_disk_and_verdict(tmp_path, monkeypatch):
    import toolchain.doctor as doctor

    # The machine's own free space varies (CI once had 0.9 GB left), so both sides are set here.
    monkeypatch.setattr(doctor, "disk_free_gb", lambda path: 50.0)
    assert check_disk(tmp_path / "not" / "yet").status == "ok"
    monkeypatch.setattr(doctor, "disk_free_gb", lambda path: 0.9)
    low = check_disk(tmp_path)
    assert low.status == "fail" and low.found == "0.9 GB" and "--out" in low.fix
    assert passed([Check("a", "ok", ""), Check("b", "warn", "")])
    assert not passed([Check("a", "ok", ""), Check("b", "fail", "")])
