"""`toolchain fleet` end to end on a tiny hypernetwork: byte identity with full exports, resume,
bad users, a forced fallback, runtime parity, shards and their merge."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from toolchain.cli import main
from toolchain.fleet import run_fleet
from toolchain.fleet import run as fleet_run

pytestmark = pytest.mark.slow
FILES = ("verifier_int8.pte", "verifier_fp32.pte", "verifier_int8.tflite", "verifier_fp32.tflite")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fleet_out(hypernet_ckpt, users_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "out"
    result = run_fleet(hypernet_ckpt, users_dir / "users", out, calibration=users_dir / "calib.npy",
                       calibration_size=16, parity_users=2)
    return out, result


def test_every_user_written_from_templates(fleet_out):
    out, result = fleet_out
    assert result.users == 7 and not result.problems and not result.fallbacks
    m = json.loads((out / "fleet_manifest.json").read_text())
    assert len(m["users"]) == 7 and set(m["templates"]) == {"executorch/int8", "executorch/fp32", "tflite/int8",
                                                             "tflite/fp32"}
    for e in m["users"]:
        assert e["mode"] == "patched" and len(e["files"]) == 4
        for f in e["files"]:
            assert _sha(out / f["path"]) == f["sha256"] and f["bytes"] == (out / f["path"]).stat().st_size
    meta = __import__("toolchain.runtime.metadata", fromlist=["x"]).read_embedded_metadata(out / "user03" / FILES[0])
    assert meta["user"] == "user03" and meta["template"] == m["templates"]["executorch/int8"]
    assert meta["threshold"] == pytest.approx(m["users"][3]["threshold"])


def test_byte_identical_to_enroll_then_export(fleet_out, hypernet_ckpt, users_dir, tmp_path):
    """`toolchain enroll` + `toolchain export` of five users, with the same calibration set: the
    same sha256 as the fleet's files, both formats, both precisions."""
    out, _ = fleet_out
    for user in ("user00", "user02", "user04", "user05", "user06"):
        udir = tmp_path / "enrolled" / user
        assert main(["enroll", "--hypernet", str(hypernet_ckpt), "--image", str(users_dir / "users" / user / "0.png"),
                     "--out", str(udir)]) == 0
        assert main(["export", str(udir), "--out", str(tmp_path / "full" / user), "--calibration",
                     str(users_dir / "calib.npy"), "--calibration-size", "16"]) == 0
        for name in FILES:
            assert _sha(tmp_path / "full" / user / name) == _sha(out / user / name), (user, name)


def test_patched_files_agree_with_float_in_their_runtimes(fleet_out):
    """Two sampled users' int8 files run in ExecuTorch and LiteRT. On 8 probes of a 30-step toy
    model one flipped decision is 12.5 points, so this checks that they run and agree; the parity
    bounds are measured on real-sized probe sets (README, `toolchain fleet --parity`)."""
    _, result = fleet_out
    assert {r["format"] for r in result.parity} == {"executorch", "tflite"} and len(result.parity) == 4
    for r in result.parity:
        assert r["probes"] == 8 and r["decision_agreement"] >= 87.5, r


def test_rerun_skips_and_interruption_resumes(fleet_out, hypernet_ckpt, users_dir, tmp_path, monkeypatch):
    out, _ = fleet_out
    again = run_fleet(hypernet_ckpt, users_dir / "users", out, calibration=users_dir / "calib.npy",
                      calibration_size=16)
    assert again.users == 0 and again.skipped_done == 7 and again.timings["build_seconds"] == 0.0

    part = tmp_path / "part"
    shutil.copytree(out / ".templates", part / ".templates")  # the cache: no template rebuild
    real, calls = fleet_run._write_user, {"n": 0}

    def crash_after_three(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(fleet_run, "_write_user", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_fleet(hypernet_ckpt, users_dir / "users", part, calibration=users_dir / "calib.npy", calibration_size=16)
    assert len(json.loads((part / "fleet_manifest.json").read_text())["users"]) == 3
    monkeypatch.setattr(fleet_run, "_write_user", real)
    resumed = run_fleet(hypernet_ckpt, users_dir / "users", part, calibration=users_dir / "calib.npy",
                        calibration_size=16)
    assert resumed.skipped_done == 3 and resumed.users == 4
    for user in ("user00", "user06"):
        for name in FILES:
            assert _sha(part / user / name) == _sha(out / user / name)


def test_bad_users_are_reported_and_the_others_complete(fleet_out, hypernet_ckpt, users_dir, tmp_path, capsys):
    out, _ = fleet_out
    src = tmp_path / "users"
    shutil.copytree(users_dir / "users" / "user01", src / "user01")
    shutil.copytree(users_dir / "users" / "user02", src / "bad id!")
    (src / "broken").mkdir()
    (src / "broken" / "0.png").write_bytes(b"not an image")
    listing = tmp_path / "users.tsv"
    listing.write_text(f"user02\t{users_dir / 'users' / 'user02' / '0.png'}\n../evil\t{users_dir / 'users' / 'user02' / '0.png'}\n")
    dest = tmp_path / "out"
    shutil.copytree(out / ".templates", dest / ".templates")
    rc = main(["fleet", "--hypernet", str(hypernet_ckpt), "--users", str(src), "--out", str(dest),
               "--calibration", str(users_dir / "calib.npy"), "--calibration-size", "16"])
    err = capsys.readouterr().err
    assert rc == 1 and "'bad id!' is not a safe file name" in err and "broken" in err and "not a readable image" in err
    for name in FILES:
        assert _sha(dest / "user01" / name) == _sha(out / "user01" / name)
    assert not (dest / "bad id!").exists() and not (dest / "broken").exists()
    rc = main(["fleet", "--hypernet", str(hypernet_ckpt), "--users", str(listing), "--out", str(dest),
               "--calibration", str(users_dir / "calib.npy"), "--calibration-size", "16"])
    err = capsys.readouterr().err
    assert rc == 1 and "users.tsv:2" in err and "'../evil'" in err
    assert _sha(dest / "user02" / FILES[2]) == _sha(out / "user02" / FILES[2])  # a TSV line: same file


def test_forced_fallback_is_a_counted_full_export(fleet_out, hypernet_ckpt, users_dir, tmp_path, monkeypatch):
    out, _ = fleet_out
    from toolchain.fleet.patch import PatchPlan

    dest = tmp_path / "out"
    shutil.copytree(out / ".templates", dest / ".templates")
    src = tmp_path / "users"
    shutil.copytree(users_dir / "users" / "user04", src / "user04")
    monkeypatch.setattr(PatchPlan, "why_not_patchable", lambda self, v, t: "forced by the test")
    result = run_fleet(hypernet_ckpt, src, dest, calibration=users_dir / "calib.npy", calibration_size=16,
                       formats=["tflite"], precisions=["int8"])
    assert result.fallbacks == ["user04: tflite int8: forced by the test"]
    entry = json.loads((dest / "fleet_manifest.json").read_text())["users"][0]
    assert entry["mode"] == "full" and entry["reason"] == "tflite int8: forced by the test"
    assert _sha(dest / "user04" / "verifier_int8.tflite") == _sha(out / "user04" / "verifier_int8.tflite")


def test_shards_merge(fleet_out, hypernet_ckpt, users_dir, tmp_path, capsys):
    out, _ = fleet_out
    dirs = []
    for i in range(2):
        d = tmp_path / f"shard{i}"
        shutil.copytree(out / ".templates", d / ".templates")
        assert main(["fleet", "--hypernet", str(hypernet_ckpt), "--users", str(users_dir / "users"), "--out", str(d),
                     "--calibration", str(users_dir / "calib.npy"), "--calibration-size", "16", "--shard", f"{i}/2",
                     "--formats", "tflite", "--precisions", "int8"]) == 0
        dirs.append(d)
    counts = [len(json.loads((d / "fleet_manifest.json").read_text())["users"]) for d in dirs]
    assert sum(counts) == 7 and all(counts)
    assert main(["fleet", "merge", *map(str, dirs), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "fleet_manifest.json").read_text())
    assert [e["user"] for e in merged["users"]] == sorted(f"user{u:02d}" for u in range(7))
    for e in merged["users"]:
        assert _sha(tmp_path / "all" / e["files"][0]["path"]) == e["files"][0]["sha256"]
    # A shard missing, or a file changed: merge fails and says why.
    assert main(["fleet", "merge", str(dirs[0]), "--out", str(tmp_path / "half")]) == 1
    victim = next((dirs[1]).glob("*/verifier_int8.tflite"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["fleet", "merge", *map(str, dirs), "--out", str(tmp_path / "bad")]) == 1
    assert "sha256" in capsys.readouterr().err

