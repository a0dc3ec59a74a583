"""The ExecuTorch runtime (Python bindings of the C++ runtime, XNNPACK linked in).

XNNPACK runs on a process-wide threadpool; `_unsafe_reset_threadpool(1)` pins it to one thread
(the runtime offers no per-program setting), so every ExecuTorch number here is single-threaded.

In-runtime latency comes from the runtime's own event tracer: the program is loaded a second
time with ETDump on (`Runtime.load_program(enable_etdump=True)`) and the devtools Inspector reads
its `Method::execute` events. (The older `_load_for_executorch_from_buffer(enable_etdump=True)`
entry point segfaults in `forward` on XNNPACK programs in ExecuTorch 1.5.1; this one does not.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.formats import check_identifier
from toolchain.runtime.base import InputInfo, Runner, latency_record
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
        check_identifier(path)  # the loader aborts the process on some corrupt files
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

    def runtime_latency(self, repeats: int = 50, warmup: int = 5, seed: int = 0) -> dict:
        """Wall time of `execute` from Python (this runner's program, no tracing), and the
        runtime's own `Method::execute` time from ETDump on a second, traced load (medians;
        warm-up calls dropped). The traced program's own wall time is not used: collecting
        XNNPACK's per-operator events costs microseconds per operator after each call."""
        calls = warmup + max(1, repeats)
        raw = etdump_times(self.path, [self._tensor(self._random_image(seed))], calls).get("Method::execute", [])
        if len(raw) != calls:
            raise ToolchainError(f"{self.path}: ETDump holds {len(raw)} Method::execute events for {calls} calls")
        return latency_record(self.latency_ms(repeats, warmup, seed), float(np.median(raw[warmup:])),
                              "ETDump Method::execute")


def etdump_times(path: str | Path, inputs: list, calls: int) -> dict[str, list[float]]:
    """Run the program at `path` `calls` times on `inputs`, one thread, with ETDump on, and
    return each event's times in ms (`Method::execute` and, for XNNPACK, every operator), read
    by the devtools Inspector (ETDump ticks are ns; its perf_data is in ms)."""
    import logging
    import tempfile
    import warnings

    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    set_executorch_threads(1)
    program = Runtime.get().load_program(str(path), enable_etdump=True)
    method = program.load_method("forward")
    for _ in range(calls):
        method.execute(inputs)
    with tempfile.TemporaryDirectory(prefix="toolchain-etdump-") as tmp:
        etdump = f"{tmp}/run.etdp"
        program.write_etdump_result_to_file(etdump, f"{tmp}/debug.bin")
        logging.getLogger("executorch").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inspector = Inspector(etdump_path=etdump)
    return {e.name: list(e.perf_data.raw) for block in inspector.event_blocks for e in block.events
            if e.perf_data is not None}
