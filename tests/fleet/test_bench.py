"""toolchain.fleet.bench on bad input (no export needed)."""

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
