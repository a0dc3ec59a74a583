"""`toolchain fleet --workers N`: N processes, each a hash shard, one joined manifest, the same bytes."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from toolchain.cli import main
from toolchain.fleet import run_fleet

pytestmark = pytest.mark.slow


def test_workers_write_the_same_files(registry_hypernet_ckpt, tmp_path):
    from PIL import Image

    from toolchain.data.synthetic import SyntheticFaces

    gen = SyntheticFaces(seed=11)
    for i, img in enumerate(gen.render_batch(list(range(5)), [0] * 5)):
        (tmp_path / "users" / f"w{i}").mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "users" / f"w{i}" / "0.png")
    np.save(tmp_path / "calib.npy", gen.render_batch(list(range(100, 116)), [0] * 16))
    common = ["--calibration", str(tmp_path / "calib.npy"), "--calibration-size", "16", "--formats", "tflite,executorch",
              "--precisions", "int8"]
    single = run_fleet(registry_hypernet_ckpt, tmp_path / "users", tmp_path / "one", calibration=tmp_path / "calib.npy",
                       calibration_size=16, precisions=["int8"])
    assert single.users == 5
    shutil.copytree(tmp_path / "one" / ".templates", tmp_path / "two" / ".templates")
    assert main(["fleet", "--hypernet", str(registry_hypernet_ckpt), "--users", str(tmp_path / "users"), "--out",
                 str(tmp_path / "two"), "--workers", "2", *common]) == 0
    merged = json.loads((tmp_path / "two" / "fleet_manifest.json").read_text())
    assert sorted(e["user"] for e in merged["users"]) == [f"w{i}" for i in range(5)]
    for e in merged["users"]:
        for f in e["files"]:
            data = (tmp_path / "two" / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
            assert data == (tmp_path / "one" / f["path"]).read_bytes()
