"""One Runner interface over torch eager, the ExecuTorch runtime and the LiteRT interpreter.

`load_runner(path_or_model)` picks the runtime from the argument: an `nn.Module` runs in torch
eager, a `.pte` in ExecuTorch, a `.tflite` in LiteRT, a checkpoint `.pt` or an enrolled user
folder is loaded as a float model. `runner.run(images_uint8_nhwc)` returns float32 (N, out_dim).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolchain.runtime.base import InputInfo, Runner
from toolchain.runtime.metadata import read_embedded_metadata

__all__ = ["InputInfo", "Runner", "load_runner", "read_embedded_metadata"]


def load_runner(source: Any, threads: int = 1) -> Runner:
    try:
        from torch import nn
    except ImportError:  # pragma: no cover - torch is part of the stack
        nn = None
    if nn is not None and isinstance(source, nn.Module):
        from toolchain.runtime.torch_runner import TorchRunner

        return TorchRunner(source)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".pte":
        from toolchain.runtime.executorch_runner import ExecuTorchRunner

        return ExecuTorchRunner(path, threads=threads)
    if suffix == ".tflite":
        from toolchain.runtime.litert_runner import LiteRTRunner

        return LiteRTRunner(path, threads=threads)
    # A float model: checkpoint or enrolled user folder.
    from toolchain.models.io import load_model
    from toolchain.runtime.torch_runner import TorchRunner

    model, meta = load_model(path)
    return TorchRunner(model, name=path.name, metadata=meta)
