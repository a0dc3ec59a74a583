"""x86 against ARM: a tiny int8 .tflite runs on XNNPACK's aarch64 kernels under emulation and
matches x86. Skips where the ARM environment is not built (`make arm-env` needs the network)."""

import json

import numpy as np
import pytest

from toolchain.cli import main
from toolchain.errors import ToolchainError

pytestmark = pytest.mark.slow
THRESHOLD = -0.05  # inside the random-init model's output range (about -0.11 to 0)


@pytest.fixture(scope="module")
def arm_env():
    from toolchain.runtime.arm64 import find_arm_env

    try:
        return find_arm_env()
    except ToolchainError as exc:
        pytest.skip(f"ARM environment not built, so the emulated run is not tested here: {exc}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, enrolled_random_verifier, arm_env):
    root = tmp_path_factory.mktemp("arm64")
    model, user, rng = enrolled_random_verifier(root, THRESHOLD)
    out = root / "out"
    rc = main(["export", str(user), "--out", str(out), "--formats", "tflite", "--precisions", "int8",
               "--calibration", str(root / "calib.npy"), "--calibration-size", "8"])
    assert rc == 0
    return {"root": root, "tflite": out / "verifier_int8.tflite", "user": user,
            "images": rng.integers(0, 256, (24, 112, 112, 3), dtype=np.uint8)}


def test_emulated_run_is_aarch64_and_matches_x86(exported, arm_env):
    from toolchain.runtime.arm64 import Arm64LiteRTRunner
    from toolchain.runtime.litert_runner import LiteRTRunner

    arm, x86 = Arm64LiteRTRunner(exported["tflite"], arm_env), LiteRTRunner(exported["tflite"])
    raw_arm, raw_x86 = arm.raw(exported["images"]), x86.raw(exported["images"])
    assert arm.where["machine"] == "aarch64" and arm.where["count"] == 24
    assert raw_arm.dtype == np.int8 and raw_arm.shape == raw_x86.shape == (24, 1)
    assert np.array_equal(raw_arm, raw_x86)
    assert np.allclose(arm.run(exported["images"]), x86.run(exported["images"]))


def test_parity_cli_arm64(exported, tmp_path, capsys):
    from toolchain.evaluate.parity import write_probe_set

    images = exported["images"]
    probes = write_probe_set(tmp_path / "probes.npz", images, [i < 4 for i in range(len(images))])
    rc = main(["parity", str(exported["tflite"]), "--pairs", str(probes), "--arch", "arm64", "--sample", "12",
               "--reference", str(exported["user"]), "--json"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["num"] == 12 and row["outputs"] == 12 and row["kind"] == "verifier"
    assert row["max_step_diff"] == 0 and row["identical_outputs"] == 12 and row["agreement_arm_x86"] == 100.0
    assert row["passed"] and row["emulated"]["machine"] == "aarch64"
