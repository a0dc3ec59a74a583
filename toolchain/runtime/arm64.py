"""Run a `.tflite` on XNNPACK's ARM kernels, here: LiteRT in an aarch64 Python under qemu's
user-mode emulation (`make arm-env` builds it; ../shared/ARM.md says what was checked).

Phones run XNNPACK's aarch64 kernels, not the x86 ones every other check here runs, and int8
kernels may round differently on the two. `Arm64LiteRTRunner` prepares the inputs on the host,
exactly as `LiteRTRunner` does, and sends a whole batch through one emulated process
(`arm64_probe.py`), because starting the emulated interpreter costs seconds.

ExecuTorch is not in the environment: its Python runtime imports torch, and PyPI's aarch64
torch wheel is the CUDA build, which does not import without NVIDIA's libraries.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.runtime.litert_runner import LiteRTRunner

ENV_VAR = "TOOLCHAIN_ARM_ENV"
PROBE = Path(__file__).with_name("arm64_probe.py")


class ArmEnvMissing(ToolchainError):
    """The ARM environment is not built (exit code 2)."""


@dataclass(frozen=True)
class ArmEnv:
    root: Path
    qemu: Path
    sysroot: Path
    python: Path
    site: Path

    def command(self, *args: str, cpu: str | None = None) -> list[str]:
        """The emulated interpreter's command line. `cpu`: qemu's CPU model; its default, `max`,
        has the dot-product and int8 matrix extensions (sdot, i8mm), so XNNPACK picks the
        kernels of a recent phone; `cortex-a53` has neither, like an older one."""
        return [str(self.qemu), *(["-cpu", cpu] if cpu else []), "-L", str(self.sysroot), str(self.python), *args]

    def process_env(self) -> dict[str, str]:
        """The environment of the emulated interpreter: this one's, with its own site folder and
        none of the host Python's paths."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        return env | {"PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1"}


def find_arm_env(root: str | Path | None = None) -> ArmEnv:
    """The environment at `root`, $TOOLCHAIN_ARM_ENV, ./.arm-env or the checkout's .arm-env."""
    candidates = [Path(root)] if root else (
        [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else
        [Path.cwd() / ".arm-env", Path(__file__).resolve().parents[2] / ".arm-env"])
    for base in candidates:
        manifest = base / "env.json"
        if manifest.is_file():
            try:
                spec = json.loads(manifest.read_text())
                env = ArmEnv(base, base / spec["qemu"], base / spec["sysroot"], base / spec["python"], base / spec["site"])
            except (ValueError, KeyError) as exc:
                raise ArmEnvMissing(f"{manifest}: unreadable ({exc}); rebuild it with `make arm-env`") from exc
            if env.qemu.is_file() and env.python.is_file():
                return env
    raise ArmEnvMissing("no ARM environment (looked in " + ", ".join(str(c) for c in candidates)
                        + "); build it with `make arm-env` (downloads about 130 MB from Debian and PyPI)")


class Arm64LiteRTRunner(LiteRTRunner):
    """A LiteRTRunner whose `invoke` happens on emulated aarch64. Latency is not measured:
    emulated time means nothing."""

    kind = "litert-arm64"

    def __init__(self, path: str | Path, env: ArmEnv | None = None, metadata: dict | None = None,
                 timeout_s: float = 3600, cpu: str | None = None):
        super().__init__(path, metadata=metadata, threads=1)  # the host interpreter: tensor details only
        self.env = env or find_arm_env()
        self.timeout_s, self.cpu = timeout_s, cpu
        self.where: dict = {}

    def raw(self, images: np.ndarray) -> np.ndarray:
        """Raw output tensors (int8 for an int8 file) of uint8 NHWC images, one emulated process."""
        from toolchain.runtime.preprocess import check_images

        images = check_images(images, (self.info.height, self.info.width), what=f"input of {self.name}")
        x = self._input(images)
        with tempfile.TemporaryDirectory(prefix="toolchain-arm64-") as tmp:
            np.save(Path(tmp) / "in.npy", x)
            out = Path(tmp) / "out.npy"
            cmd = self.env.command(str(PROBE), str(Path(self.path).resolve()), str(Path(tmp) / "in.npy"), str(out),
                                   cpu=self.cpu)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s,
                                      env=self.env.process_env())
            except subprocess.TimeoutExpired as exc:
                raise ToolchainError(f"{self.name}: the emulated run took over {self.timeout_s:.0f} s") from exc
            if done.returncode != 0 or not out.is_file():
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise ToolchainError(f"{self.name}: the emulated aarch64 run failed (exit {done.returncode}): {tail}")
            self.where = json.loads(done.stdout.strip().splitlines()[-1])
            if self.where.get("machine") != "aarch64":
                raise ToolchainError(f"{self.name}: the emulated run reports machine {self.where.get('machine')}")
            return np.load(out)

    def run(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        y = self.dequantize(self.raw(images))
        return y.reshape(len(y), -1).astype(np.float32)

    def latency_ms(self, repeats: int = 50, warmup: int = 5, seed: int = 0) -> float:
        return float("nan")
