"""Where the verifier's int8 time goes: single-thread latency of growing prefixes of f, int8 and
fp32, in LiteRT (onnx2tf) and ExecuTorch (XNNPACK); then three equivalent forms of the stem.

    python benchmarks/bench_verifier_layers.py [--repeats N]

Each row is the whole prefix up to that layer, exported the way `toolchain export` exports the
verifier (exact-input stem, pinned input quantisation; int8 with the row stem of
toolchain/export/row_stem.py, fp32 with the plain conv), so the difference between two rows is
the cost of the layers between them. The stem rows are built directly in TensorFlow (a 4x4
stride-4 conv on 3 channels; space-to-depth then a 1x1 conv; a free NHWC reshape to 12 channels
then a 4x1 conv): the same arithmetic, laid out differently for XNNPACK's int8 kernels.
Random weights: latency does not depend on them. The int8 `.pte` rows keep the row stem, as
the `.pte` had it before toolchain/export/nhwc_input.py (benchmarks/bench_pte_input_layout.py
measures the `.pte` as shipped now).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

from toolchain.export.api import _exact_input_view
from toolchain.export.row_stem import with_row_stem
from toolchain.export.tflite import export_tflite_onnx2tf
from toolchain.models import build_model
from toolchain.quantize.exact_input import INPUT_SCALE, INPUT_ZERO_POINT
from toolchain.quantize.pt2e import quantize_xnnpack_int8
from toolchain.runtime.base import median_ms

# Index into Verifier.features after which each prefix ends (the ReLU of each stage).
CUTS = {"stem": 2, "+ block 1 (28x28)": 6, "+ block 2 (14x14)": 10, "+ block 3 (7x7)": 14, "+ pool": 16,
        "+ head (whole f)": None}


def _litert_ms(buf: bytes, repeats: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=buf, num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    return median_ms(interp.invoke, repeats, warmup=20)


def _pte_ms(module: nn.Module, example, calib, spec, precision: str, repeats: int, tmp: str) -> float:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    if precision == "int8":
        module = quantize_xnnpack_int8(module, example, calib, spec.mean, spec.std,
                                       input_qparams=(INPUT_SCALE, INPUT_ZERO_POINT))
    program = torch.export.export(module, (example,), strict=False)
    with open(tmp, "wb") as f:
        f.write(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    method = Runtime.get().load_program(tmp).load_method("forward")
    return median_ms(lambda: method.execute([example]), repeats, warmup=20)


def prefix_rows(repeats: int, tmp: str) -> list[tuple]:
    torch.manual_seed(0)
    model, spec = _exact_input_view(build_model("verifier").eval())
    int8_model = with_row_stem(model, 112)  # as `toolchain export` makes the int8 .tflite
    calib = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    example = torch.zeros(1, 3, 112, 112)

    def prefix(m, cut):
        return m if cut is None else nn.Sequential(*list(m.features)[:cut]).eval()

    rows = []
    for name, cut in track(CUTS.items(), description="prefixes", transient=True):
        q8, f32 = prefix(int8_model, cut), prefix(model, cut)
        b8 = export_tflite_onnx2tf(q8, example, ["int8"], calib, spec.mean, spec.std, exact_input=True)["int8"]
        b32 = export_tflite_onnx2tf(f32, example, ["fp32"], None, spec.mean, spec.std)["fp32"]
        rows.append((name, _litert_ms(b8, repeats), _litert_ms(b32, repeats),
                     _pte_ms(q8, example, calib, spec, "int8", repeats, tmp),
                     _pte_ms(f32, example, calib, spec, "fp32", repeats, tmp)))
    return rows


def stem_rows(repeats: int) -> list[tuple]:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(size=(4, 4, 3, 16)).astype(np.float32) * 0.1)
    forms = {
        "conv 4x4 stride 4 on 3 channels (fp32 files)": lambda x: tf.nn.conv2d(x, w, 4, "VALID"),
        "space-to-depth 4, then 1x1 conv on 48": lambda x: tf.nn.conv2d(tf.nn.space_to_depth(x, 4),
                                                                       tf.reshape(w, (1, 1, 48, 16)), 1, "VALID"),
        "reshape to 112x28x12, then 4x1 conv (int8 files)": lambda x: tf.nn.conv2d(
            tf.reshape(x, (1, 112, 28, 12)), tf.reshape(w, (4, 1, 12, 16)), (4, 1), "VALID"),
    }
    rows = []
    for name, body in forms.items():
        fn = tf.function(lambda x, body=body: tf.nn.relu(body(x)),
                         input_signature=[tf.TensorSpec((1, 112, 112, 3), tf.float32)])
        times = {}
        for precision in ("int8", "fp32"):
            conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
            if precision == "int8":
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
                conv.representative_dataset = lambda: ([rng.uniform(-1, 1, (1, 112, 112, 3)).astype(np.float32)]
                                                       for _ in range(16))
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                conv.inference_input_type = conv.inference_output_type = tf.int8
            times[precision] = _litert_ms(conv.convert(), repeats)
        rows.append((name, times["int8"], times["fp32"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        prefixes = prefix_rows(args.repeats, f"{tmp}/prefix.pte")
    stems = stem_rows(args.repeats)
    console = Console(width=120)
    t = Table(title="verifier prefixes: median ms, one thread (each row includes the rows above)")
    for col in ("prefix", "LiteRT int8", "LiteRT fp32", "ratio", "ExecuTorch int8", "ExecuTorch fp32", "ratio"):
        t.add_column(col, justify="left" if col == "prefix" else "right")
    for name, li8, lf32, ei8, ef32 in prefixes:
        t.add_row(name, f"{li8:.3f}", f"{lf32:.3f}", f"{li8 / lf32:.2f}", f"{ei8:.3f}", f"{ef32:.3f}", f"{ei8 / ef32:.2f}")
    console.print(t)
    s = Table(title="the stem alone, three equivalent forms (LiteRT, TensorFlow-built): median ms, one thread")
    for col in ("form", "int8", "fp32", "ratio"):
        s.add_column(col, justify="left" if col == "form" else "right")
    for name, i8, f32 in stems:
        s.add_row(name, f"{i8:.3f}", f"{f32:.3f}", f"{i8 / f32:.2f}")
    console.print(s)


if __name__ == "__main__":
    main()
