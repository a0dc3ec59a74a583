"""What the verifier's `.pte` spends on its input layout, and why the shipped files keep NCHW.

    python benchmarks/bench_pte_input_layout.py [--calls N]

Exports a random-init verifier with `toolchain export`'s quantisation (exact-input stem, pinned
input quantisation) in seven forms: fp32 and int8 on a contiguous NCHW input (fp32 as shipped;
int8 with the row stem, as shipped before, and as shipped now: plain stem, the input copied to
channels-last before its quantise, toolchain.export.nhwc_input); each precision on a
channels-last input (dim order 0, 2, 3, 1); and, both with a plain stem, on a contiguous
NHWC-shaped input that the graph permutes to NCHW. Prints ExecuTorch's
`Method::execute` and per-operator times from ETDump (median of N calls, one thread). Then it
feeds a contiguous NCHW tensor to a program exported for channels-last input and prints the
output error: the runtime reads it as NHWC without an error (pytorch/executorch#21837 is the same
bug in the other direction), which is why the shipped files keep the NCHW input that app code
fills.
"""

from __future__ import annotations

import argparse
import tempfile
from unittest.mock import patch

import numpy as np
import torch

from toolchain.export.api import _exact_input_view
from toolchain.export.executorch import xnnpack_partitioner
from toolchain.export.nhwc_input import drop_noop_as_strided, nhwc_before_quantize
from toolchain.export.row_stem import with_row_stem
from toolchain.models import build_model
from toolchain.quantize.exact_input import INPUT_SCALE, INPUT_ZERO_POINT
from toolchain.quantize.pt2e import quantize_xnnpack_int8
from toolchain.runtime.executorch_runner import etdump_times, set_executorch_threads

_SKIP = {"Method::execute", "Program::load_method", "Method::init", "DELEGATE_CALL"}


def _lower(module, example, transform_passes=()) -> bytes:
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, (example,), strict=False)
    return to_edge_transform_and_lower(program, transform_passes=list(transform_passes),
                                       partitioner=[xnnpack_partitioner()]).to_executorch().buffer


class _NHWCInput(torch.nn.Module):
    """Takes a contiguous (N, H, W, C) tensor and permutes it to NCHW inside the graph: the app's
    NHWC buffer with a shape the runtime checks, instead of a dim order it does not."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def _etdump_us(buf: bytes, x: torch.Tensor, calls: int, warmup: int = 20) -> dict[str, float]:
    """Median µs of each ETDump event over `calls` calls after `warmup`."""
    with tempfile.TemporaryDirectory() as tmp:
        open(f"{tmp}/m.pte", "wb").write(buf)
        times = etdump_times(f"{tmp}/m.pte", [x], calls + warmup)
    return {name: float(np.median(raw[warmup:] or raw)) * 1e3 for name, raw in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    set_executorch_threads(1)
    torch.manual_seed(0)
    model, spec = _exact_input_view(build_model("verifier").eval())
    row_stem = with_row_stem(model, 112)
    calib = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    nchw = torch.zeros(1, 3, 112, 112)
    last = nchw.contiguous(memory_format=torch.channels_last)
    nhwc = torch.zeros(1, 112, 112, 3)

    def int8(m, example):
        return quantize_xnnpack_int8(m, example, calib, spec.mean, spec.std, input_qparams=(INPUT_SCALE, INPUT_ZERO_POINT))

    def int8_nhwc(m, example):  # calibration batches come NCHW: hand them over as NHWC
        import toolchain.quantize.pt2e as pt2e

        nchw_batches = pt2e.calibration_batches
        with patch.object(pt2e, "calibration_batches",
                          lambda *a, **k: (x.permute(0, 2, 3, 1).contiguous() for x in nchw_batches(*a, **k))):
            return int8(m, example)

    forms = {
        "fp32, NCHW input (shipped)": (_lower(model, nchw), nchw),
        "int8, NCHW input, row stem (shipped before)": (_lower(int8(row_stem, nchw), nchw), nchw),
        "int8, NCHW input, NHWC copy before the quantise (shipped)":
            (_lower(nhwc_before_quantize(int8(model, nchw)), nchw, [drop_noop_as_strided]), nchw),
        "fp32, channels-last input": (_lower(model, last, [drop_noop_as_strided]), last),
        "int8, channels-last input, plain stem": (_lower(int8(model, last), last, [drop_noop_as_strided]), last),
        "fp32, NHWC-shaped input, permute in graph": (_lower(_NHWCInput(model), nhwc), nhwc),
        "int8, NHWC-shaped input, permute, plain stem": (_lower(int8_nhwc(_NHWCInput(model), nhwc), nhwc), nhwc),
    }
    print(f"ExecuTorch ETDump, median of {args.calls} calls, one thread (µs)")
    for name, (buf, x) in forms.items():
        t = _etdump_us(buf, x, args.calls)
        ops = {k: v for k, v in t.items() if k not in _SKIP and v > 0}
        transposes = sum(v for k, v in ops.items() if k.startswith("Transpose"))
        print(f"{name:58s} execute {t['Method::execute']:6.1f}  operators {sum(ops.values()):5.1f}  "
              f"transposes {transposes:5.1f}")
        print("    " + "; ".join(f"{k} {v:.0f}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))

    # The layout trap, on a model whose output depends on where each pixel is (conv, flatten,
    # linear; the random-init verifier's pooled logit barely moves with its input).
    from executorch.runtime import Runtime

    probe = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2), torch.nn.ReLU(), torch.nn.Flatten(1),
                                torch.nn.Linear(8 * 7 * 7, 4)).eval()
    example = torch.zeros(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        open(f"{tmp}/m.pte", "wb").write(_lower(probe, example))
        method = Runtime.get().load_program(f"{tmp}/m.pte").load_method("forward")
        x = torch.randn(1, 3, 16, 16)
        ref = probe(x).detach()
        err_cl = float((method.execute([x.contiguous(memory_format=torch.channels_last)])[0] - ref).abs().max())
        err_nchw = float((method.execute([x.contiguous()])[0] - ref).abs().max())
    print(f"a program exported for channels-last input: max output error {err_cl:.2e} on channels-last input, "
          f"{err_nchw:.2e} on contiguous NCHW input (outputs up to {float(ref.abs().max()):.2e}); no error raised")


if __name__ == "__main__":
    main()
