"""The ARM environment's locator: a missing environment is a clear error with exit code 2."""

import pytest

from toolchain.cli import main
from toolchain.runtime.arm64 import ArmEnvMissing, find_arm_env


def test_missing_env_says_how_to_build_it(tmp_path, monkeypatch):
    with pytest.raises(ArmEnvMissing, match="make arm-env") as err:
        find_arm_env(tmp_path / "nowhere")
    assert err.value.exit_code == 2
    (tmp_path / "env.json").write_text("{not json")
    with pytest.raises(ArmEnvMissing, match="unreadable"):
        find_arm_env(tmp_path)


def test_parity_arch_arm64_exits_2_without_env(tmp_path, monkeypatch, capsys):
    import numpy as np

    from toolchain.evaluate.parity import write_probe_set

    monkeypatch.setenv("TOOLCHAIN_ARM_ENV", str(tmp_path / "none"))
    probes = write_probe_set(tmp_path / "p.npz", np.zeros((2, 112, 112, 3), np.uint8), [True, False])
    art = tmp_path / "m.tflite"
    art.write_bytes(b"\0" * 16)
    rc = main(["parity", str(art), "--pairs", str(probes), "--arch", "arm64", "--reference", str(art)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "make arm-env" in err and "Traceback" not in err
