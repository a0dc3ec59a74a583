"""toolchain.fleet.bench: bad input (no export needed), and what it reads."""

import numpy as np
import pytest

from toolchain.errors import ToolchainError
from toolchain.fleet.bench import bench_fleet


def test_a_file_that_is_not_a_hypernet_fails_before_the_users_are_rendered(tmp_path):
    """`toolchain bench fleet` wrote 19 MB of users and calibration images first."""
    bad = tmp_path / "hypernet.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ToolchainError):
        bench_fleet(bad, 2, tmp_path / "out", say=lambda *_: None)
    assert not (tmp_path / "out" / "data").exists()


@pytest.mark.slow
def test_the_benchmark_reads_the_hypernet_once(registry_hypernet_ckpt, tmp_path, monkeypatch):
    """It is loaded first to fail early; the fleet it times is given that bundle, not the path."""
    import toolchain.models.hypernet as hypernet_module

    calls = []
    load = hypernet_module.load_hypernet
    monkeypatch.setattr(hypernet_module, "load_hypernet", lambda path: calls.append(path) or load(path))
    rows = bench_fleet(registry_hypernet_ckpt, 2, tmp_path / "out", formats=("executorch",), precisions=("fp32",),
                       calibration_size=16, say=lambda *_: None)
    assert len(calls) == 1 and rows["users"] == 2
    assert len(list((tmp_path / "out" / "fleet").glob("*/*.pte"))) == 2 and rows["identity_equal"] == 2
