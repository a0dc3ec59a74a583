"""What a backbone's PReLUs cost in int8: in-runtime latency of one backbone exported with each
form of PReLU, int8 and fp32, in ExecuTorch (XNNPACK) and LiteRT (onnx2tf).

    python benchmarks/bench_prelu_forms.py [--model mobilefacenet | --checkpoint PT] [--repeats N]
        [--runtimes executorch,litert] [--images N]

Rows (all int8 but the first):
- fp32: the plain PReLU, one float op (what the fp32 artifacts hold);
- PReLU left in float: a float island each, dequantise, PReLU, quantise (ExecuTorch only: the
  layers are left out of the quantizer's annotations, which LiteRT's converter does not read);
- XNNPACK's int8 PReLU: one int8 op (ExecuTorch only: what the int8 `.pte` holds);
- LiteRT's int8 PRELU: one int8 op that LiteRT's XNNPACK delegate refuses (LiteRT only), so each
  runs in LiteRT's own kernel, outside the delegate, and splits the graph;
- three ops: a*x + (1 - a)*relu(x) on two depthwise 1x1 convolutions and an add (the form the
  int8 artifacts had before);
- two ops: x + (1 - a)*relu(-x), one depthwise 1x1 with a fused ReLU and an add
  (toolchain/export/int8_prelu.py, what the int8 `.tflite` holds);
- multiply and add: x + relu(-|1 - a|*x) with an elementwise multiply by a per-channel constant
  in place of the depthwise 1x1 (the slopes benchmarked here are below 1; in int8 the constant
  gets one scale for all channels, so this form is not exact there);
- max(x, a*x): a depthwise 1x1 (weights a) and an elementwise maximum; PReLU only where every
  slope is at most 1, so slopes above 1 are clamped (not exact for MobileFaceNet's second PReLU);
- ReLU instead of PReLU: not the same function; the speed of the network with its PReLUs free.

Latency is inside the runtime, one thread, median: ExecuTorch's `Method::execute` (ETDump),
LiteRT's `invoke()` less a one-op model's. Random weights by default, with random per-channel
PReLU slopes (`random_slopes`). With `--checkpoint` (a trained backbone, such as
recipes/checkpoints/mobilefacenet.pt) the table also gives each file's embedding cosine to the
float model, mean and min over `--images` synthetic faces, so a form that is faster but not
exact in int8 shows what it costs. Every file is
calibrated the same plain way (the quantizers' own ranges on 32 synthetic faces; no MSE ranges,
bias correction, QAT or fallback, as the recipes have), so the cosines compare forms with each
other, not with a recipe's files. The CPU and its int8 features are printed with the table; every
ratio comes from this one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from toolchain.data import SyntheticFaces
from toolchain.environment import describe_cpu
from toolchain.errors import ToolchainError
from toolchain.export.executorch import xnnpack_partitioner
from toolchain.export.int8_prelu import with_int8_prelu
from toolchain.export.module_swap import replace_modules
from toolchain.export.tflite import export_tflite_onnx2tf
from toolchain.models import build_model
from toolchain.models.io import load_model
from toolchain.quantize.int8_options import Int8Options
from toolchain.quantize.pt2e import quantize_xnnpack_int8
from toolchain.runtime.executorch_runner import ExecuTorchRunner
from toolchain.runtime.litert_runner import LiteRTRunner
from toolchain.runtime.preprocess import model_input

MEAN = STD = (0.5, 0.5, 0.5)


class ThreeOpPReLU(nn.Module):
    """The earlier int8 form: a*x + s*relu(|1 - a|*x) (s = +1 for the slopes benchmarked here)."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        a = prelu.weight.detach().float().flatten()
        c = len(a)
        self.linear, self.positive = nn.Conv2d(c, c, 1, groups=c, bias=False), nn.Conv2d(c, c, 1, groups=c, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(a.view(c, 1, 1, 1))
            self.positive.weight.copy_((1 - a).abs().view(c, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.relu(self.positive(x))


class MultiplyPReLU(nn.Module):
    """x + relu(-|1 - a|*x) as an elementwise multiply by a (1, C, 1, 1) constant."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        a = prelu.weight.detach().float().flatten()
        self.register_buffer("negative", -(1 - a).abs().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(x * self.negative)


class MaxPReLU(nn.Module):
    """max(x, a*x), the per-channel multiply on a depthwise 1x1: PReLU where every slope is at most
    1, so slopes above 1 are clamped to 1 (MobileFaceNet's second PReLU has some: not exact there)."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        a = prelu.weight.detach().float().flatten().clamp(max=1.0)
        c = len(a)
        self.scaled = nn.Conv2d(c, c, 1, groups=c, bias=False)
        with torch.no_grad():
            self.scaled.weight.copy_(a.view(c, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.scaled(x))


def _is_prelu(m: nn.Module) -> bool:
    return isinstance(m, nn.PReLU)


def forms(model: nn.Module) -> dict[str, tuple[nn.Module, str, Int8Options | None]]:
    """name -> (module, precision, the int8 options of the .pte: which layers stay float)."""
    prelus = tuple(name for name, m in model.named_modules() if _is_prelu(m))
    return {
        "fp32 (plain PReLU)": (model, "fp32", Int8Options()),
        "int8, PReLU left in float (.pte)": (model, "int8", Int8Options(float_layers=prelus)),
        "int8, XNNPACK's int8 PReLU (.pte)": (model, "int8", Int8Options()),
        "int8, LiteRT's int8 PRELU, not delegated": (model, "int8", Int8Options()),
        "int8, three ops (earlier form)": (replace_modules(model, _is_prelu, ThreeOpPReLU), "int8", Int8Options()),
        "int8, two ops (int8_prelu.py, .tflite)": (with_int8_prelu(model), "int8", Int8Options()),
        "int8, multiply and add (not exact in int8)": (replace_modules(model, _is_prelu, MultiplyPReLU), "int8",
                                                       Int8Options()),
        "int8, max(x, a*x) (slopes above 1 clamped)": (replace_modules(model, _is_prelu, MaxPReLU), "int8",
                                                       Int8Options()),
        "int8, ReLU instead (not exact)": (replace_modules(model, _is_prelu, lambda p: nn.ReLU()), "int8",
                                           Int8Options()),
    }


# The same plain module gives each runtime's own one-op PReLU; the float layers are a .pte option.
ONLY = {"int8, PReLU left in float (.pte)": "executorch", "int8, XNNPACK's int8 PReLU (.pte)": "executorch",
        "int8, LiteRT's int8 PRELU, not delegated": "litert"}


def _runner(module, precision, int8, runtime, calib, example, tmp: Path):
    """The form exported to `runtime` in `precision`, loaded in that runtime."""
    meta = {"input": {"mean": list(MEAN), "std": list(STD)}, "output": "embedding"}
    if runtime == "executorch":
        from executorch.exir import to_edge_transform_and_lower

        if precision == "int8":
            module = quantize_xnnpack_int8(module, example, calib, MEAN, STD, int8=int8)
        program = torch.export.export(module, (example,), strict=False)
        path = tmp / f"m_{precision}.pte"
        path.write_bytes(to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()]).to_executorch().buffer)
        return ExecuTorchRunner(path, metadata=meta)
    data = export_tflite_onnx2tf(module, example, [precision], calib, MEAN, STD)[precision]
    path = tmp / f"m_{precision}.tflite"
    path.write_bytes(data)
    return LiteRTRunner(path, metadata=meta)


def random_slopes(model: nn.Module, seed: int = 0) -> nn.Module:
    """Per-channel PReLU slopes drawn from [0.05, 0.45). At init every slope is 0.25, and with
    the same constant in every channel LiteRT ran the multiply form's MUL far faster than with
    trained or random per-channel slopes (MobileFaceNet on the AMD EPYC with AVX-VNNI: 0.49 x
    fp32 against 0.76-0.79 x, docs/int8-backbones.md), so init slopes would flatter it."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if _is_prelu(m):
                m.weight.copy_(0.05 + 0.4 * torch.rand(m.weight.shape, generator=rng))
    return model


def cosine_to_float(embeddings: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean, min) over the rows of the cosine between a file's embeddings and the float model's."""
    a = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def faces(n: int, first_identity: int) -> np.ndarray:
    """n synthetic faces (uint8 NHWC, 112x112), one view each of n identities."""
    return SyntheticFaces(seed=0).render_batch(np.arange(n) + first_identity, np.arange(n) % 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilefacenet")
    ap.add_argument("--checkpoint", type=Path, help="a trained backbone (.pt): adds the cosine to float")
    ap.add_argument("--images", type=int, default=128, help="synthetic faces the cosine is measured on")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--runtimes", default="executorch,litert")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model = load_model(args.checkpoint)[0] if args.checkpoint else random_slopes(build_model(args.model).eval())
    except (ToolchainError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    label = args.checkpoint.name if args.checkpoint else f"{args.model} (random weights)"
    calib = faces(32, 5000)
    images = faces(args.images, 9000) if args.checkpoint else None
    if images is not None:
        with torch.no_grad():
            reference = model(torch.from_numpy(model_input(images, MEAN, STD))).numpy()
    example = torch.zeros(1, 3, 112, 112)
    runtimes = args.runtimes.split(",")
    console = Console(width=140)
    times: dict[tuple[str, str], float] = {}
    cosines: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-prelu-") as tmp:
        for name, (module, precision, int8) in forms(model).items():
            for runtime in runtimes:
                if ONLY.get(name, runtime) != runtime:
                    continue
                runner = _runner(module, precision, int8, runtime, calib, example, Path(tmp))
                times[name, runtime] = runner.runtime_latency(args.repeats, warmup=20)["runtime_ms"]
                line = f"{name} / {runtime}: {times[name, runtime]:.3f} ms"
                if images is not None:
                    cosines[name, runtime] = cosine_to_float(runner.run(images), reference)
                    line += " cosine to float {:.5f} mean / {:.4f} min".format(*cosines[name, runtime])
                console.print(line)
    t = Table(title=f"{label}: in-runtime ms (one thread, median of {args.repeats}) and ratio to fp32 "
                    f"in the same runtime" + (f", cosine to float on {args.images} synthetic faces" if cosines else "")
                    + f"; {describe_cpu()}")
    t.add_column("PReLU form")
    for runtime in runtimes:
        t.add_column(f"{runtime} ms", justify="right")
        t.add_column("/ fp32", justify="right")
        if cosines:
            t.add_column(f"{runtime} cosine mean / min", justify="right")
    fp32 = "fp32 (plain PReLU)"
    for name in dict.fromkeys(n for n, _ in times):
        cells = []
        for runtime in runtimes:
            if (name, runtime) not in times:
                cells += ["-", "-"] + (["-"] if cosines else [])
                continue
            cells += [f"{times[name, runtime]:.3f}", f"{times[name, runtime] / times[fp32, runtime]:.2f}"]
            if cosines:
                cells.append("{:.5f} / {:.4f}".format(*cosines[name, runtime]))
        t.add_row(name, *cells)
    console.print(t)


if __name__ == "__main__":
    main()
