"""Grouped 3x3 convolutions (VarGFaceNet's: 8 input channels a group) in int8 and fp32, in both
runtimes, against the same network with dense 3x3 convolutions.

    python benchmarks/bench_grouped_conv.py [--channels 64] [--blocks 6] [--repeats 300] [--rounds 3]

The network: a 4x4 stride-4 stem (112 -> 28), then `--blocks` 3x3 convolutions of `--channels`
channels with ReLU, average pooling and a linear embedding. Each form is exported with
`export_model` (int8 and fp32, `.pte` and onnx2tf `.tflite`, 16 random calibration images,
random weights: latency does not depend on them), then every file is timed inside its runtime,
one thread (ExecuTorch's ETDump `Method::execute`, LiteRT's `invoke()` less a one-op model's),
each file in turn in each round (`interleaved_latency`, as `toolchain bench`); the table gives the
median over rounds, the CPU named.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from toolchain.environment import describe_cpu
from toolchain.export import export_model
from toolchain.export.bench import interleaved_latency
from toolchain.models.registry import ModelSpec

GROUP = 8  # input channels a group, as in VarGFaceNet


class ConvNet(nn.Module):
    def __init__(self, channels: int, blocks: int, grouped: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 4), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, groups=channels // GROUP if grouped else 1), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.emb = nn.Linear(channels, 32)
        self.spec = ModelSpec(name="grouped" if grouped else "dense", output="embedding", output_dim=32)

    def forward(self, x):
        return self.emb(self.body(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    calib = np.random.default_rng(0).integers(0, 256, (16, 112, 112, 3), dtype=np.uint8)
    table = Table(title=f"{args.blocks} 3x3 convolutions of {args.channels} channels at 28x28: in-runtime ms, "
                        f"one thread, median of {args.rounds} rounds; {describe_cpu()}")
    for col in ("3x3 convolutions", "runtime", "int8 ms", "fp32 ms", "int8 / fp32"):
        table.add_column(col, justify="left" if col in ("3x3 convolutions", "runtime") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for grouped in (True, False):
            recs = export_model(ConvNet(args.channels, args.blocks, grouped).eval(), f"{tmp}/{grouped}",
                                ["executorch", "tflite"], ["int8", "fp32"], calib, progress=False)
            latency = interleaved_latency({(r.format, r.precision): r.path for r in recs}, args.repeats, args.rounds)
            ms = {k: v["runtime_ms"] if v.get("runtime_ms") is not None else v["wall_ms"] for k, v in latency.items()}
            for fmt, name in (("executorch", "ExecuTorch"), ("tflite", "TFLite (onnx2tf)")):
                i8, f32 = ms[(fmt, "int8")], ms[(fmt, "fp32")]
                table.add_row(f"grouped ({GROUP} channels a group)" if grouped else "dense", name,
                              f"{i8:.3f}", f"{f32:.3f}", f"{i8 / f32:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
