"""The ExecuTorch runtime (Python bindings of the C++ runtime, XNNPACK linked in).

XNNPACK runs on a process-wide threadpool; `_unsafe_reset_threadpool(1)` pins it to one thread
(the runtime offers no per-program setting), so every ExecuTorch number here is single-threaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.runtime.base import InputInfo, Runner
from toolchain.runtime.metadata import read_embedded_metadata
from toolchain.runtime.preprocess import model_input, normalise


def set_executorch_threads(n: int = 1) -> None:
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


class ExecuTorchRunner(Runner):
    kind = "executorch"

    def __init__(self, path: str | Path, metadata: dict | None = None, threads: int = 1):
        import torch  # noqa: F401 - the runtime's tensors are torch tensors
        from executorch.runtime import Runtime

        path = Path(path)
        meta = metadata if metadata is not None else read_embedded_metadata(path)
        set_executorch_threads(threads)
        try:
            program = Runtime.get().load_program(str(path))
            self.method = program.load_method("forward")
        except Exception as exc:  # noqa: BLE001
            raise ToolchainError(f"{path}: cannot load with the ExecuTorch runtime ({exc})".splitlines()[0]) from exc
        tin = self.method.metadata.input_tensor_meta(0)
        info = InputInfo.from_artifact(path, list(tin.sizes()), meta)
        super().__init__(path.name, info, meta.get("output", "embedding"), meta)
        self.path = path

    def _tensor(self, images: np.ndarray):
        import torch

        if self.info.layout == "NCHW":
            return torch.from_numpy(model_input(images, self.info.mean, self.info.std))
        return torch.from_numpy(normalise(images, self.info.mean, self.info.std))

    def _run_batch(self, images: np.ndarray) -> np.ndarray:
        out = self.method.execute([self._tensor(images)])
        return out[0].float().numpy()

    def _timed_call(self, image: np.ndarray):
        x = [self._tensor(image)]
        return lambda: self.method.execute(x)
