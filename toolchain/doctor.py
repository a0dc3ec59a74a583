"""`toolchain doctor`: does this environment run a recipe? Checked before a long run, not during it.

Each check gives a status ("ok", "warn" or "fail"), what it found and, when not ok, how to fix it.
"fail" means a recipe cannot run (a missing or wrongly pinned runtime, a runtime that does not run
a tiny model, no disk); "warn" means it runs with less (no int8 dot products: int8 is slower
there; the optional litert-torch backend missing).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from toolchain.environment import (
    STACK, cpu_facts, cuda_devices, describe_cpu, disk_free_gb, installed_version, pinned_versions,
)

OPTIONAL = {"litert-torch"}  # the second TFLite backend (export.tflite_backend)
MIN_FREE_GB = 2.0
_FIX_INSTALL = "run `make install` (it reinstalls the pinned stack into .venv)"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    found: str
    fix: str = ""


def check_versions() -> list[Check]:
    import platform

    pins = pinned_versions()
    new_enough = tuple(map(int, platform.python_version_tuple()[:2])) >= (3, 10)
    rows = [Check("python", "ok" if new_enough else "fail", platform.python_version(),
                  "" if new_enough else "use Python 3.10 or newer")]
    for dist in STACK:
        have, pin = installed_version(dist), pins.get(dist)
        bad = "warn" if dist in OPTIONAL else "fail"
        if have is None:
            rows.append(Check(dist, bad, f"not installed (pin {pin or '?'})", _FIX_INSTALL))
        elif pin is not None and have.split("+")[0] != pin:  # a local label (+cpu) is the same release
            rows.append(Check(dist, bad, f"{have}, pinned {pin}", _FIX_INSTALL))
        else:
            rows.append(Check(dist, "ok", have + (" (pinned)" if pin else "")))
    return rows


def _tiny_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)).eval(), \
        torch.rand(1, 3, 16, 16)


def _timed(fn) -> str:
    t0 = time.perf_counter()
    fn()
    return f"{time.perf_counter() - t0:.1f} s"


def check_executorch() -> Check:
    """Lower a tiny conv net to XNNPACK, run the .pte in the ExecuTorch runtime, compare to torch."""
    def run():
        import numpy as np
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime

        model, x = _tiny_model()
        program = to_edge_transform_and_lower(torch.export.export(model, (x,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
        with tempfile.TemporaryDirectory(prefix="toolchain-doctor-") as tmp:
            path = Path(tmp) / "tiny.pte"
            path.write_bytes(program.buffer)
            out = Runtime.get().load_program(str(path)).load_method("forward").execute([x])[0]
        if not np.allclose(out.numpy(), model(x).detach().numpy(), atol=1e-5):
            raise RuntimeError("the .pte's output differs from torch's")
    return _runtime_check("ExecuTorch + XNNPACK runs a .pte", run)


def check_tflite() -> Check:
    """Convert a tiny ONNX model with onnx2tf, offline, and run it in LiteRT with XNNPACK."""
    def run():
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        from toolchain.export.tflite import export_tflite_onnx2tf

        model, x = _tiny_model()
        blob = export_tflite_onnx2tf(model, x, ["fp32"], None, (0.0,) * 3, (1.0,) * 3)["fp32"]
        interp = Interpreter(model_content=blob, num_threads=1)
        interp.allocate_tensors()
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        interp.set_tensor(inp["index"], x.numpy().transpose(0, 2, 3, 1).astype(np.float32))
        interp.invoke()
        if not np.allclose(interp.get_tensor(out["index"]), model(x).detach().numpy(), atol=1e-4):
            raise RuntimeError("the .tflite's output differs from torch's")
    return _runtime_check("onnx2tf converts offline; LiteRT + XNNPACK runs it", run)


def _runtime_check(name: str, fn) -> Check:
    try:
        took = _timed(fn)
    except ImportError as exc:
        return Check(name, "fail", f"cannot import {exc.name or exc}", _FIX_INSTALL)
    except Exception as exc:  # noqa: BLE001 - the check reports, it does not crash
        line = (str(exc).strip().splitlines() or [""])[0][:160]
        return Check(name, "fail", f"{type(exc).__name__}: {line}",
                     f"{_FIX_INSTALL}; rerun `toolchain --verbose doctor` to see the library's own output")
    return Check(name, "ok", f"ran a tiny model in {took}")


def check_cpu() -> Check:
    facts = cpu_facts()
    if facts["int8_dot"]:
        return Check("CPU int8 features", "ok", describe_cpu(facts))
    return Check("CPU int8 features", "warn", describe_cpu(facts),
                 "no int8 dot-product instructions: int8 files may run slower than fp32 on this CPU")


def check_cuda() -> Check:
    devices = cuda_devices()
    return Check("CUDA devices", "ok", ", ".join(devices) if devices else "none (training runs on the CPU)")


def check_disk(path: str | Path) -> Check:
    free = disk_free_gb(path)
    if free < MIN_FREE_GB:
        return Check(f"free disk at {path}", "fail", f"{free:.1f} GB",
                     f"free at least {MIN_FREE_GB:.0f} GB, or run with --out on another disk")
    return Check(f"free disk at {path}", "ok", f"{free:.1f} GB")


def run_checks(artifacts_dir: str | Path = "artifacts", runtimes: bool = True) -> list[Check]:
    checks = check_versions()
    if runtimes:
        checks += [check_executorch(), check_tflite()]
    return checks + [check_cpu(), check_cuda(), check_disk(artifacts_dir)]


def passed(checks: list[Check]) -> bool:
    return all(c.status != "fail" for c in checks)
