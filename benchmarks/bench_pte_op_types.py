"""Where an int8 `.pte` gains or loses time against its fp32 twin: ExecuTorch's per-operator
ETDump events, summed by XNNPACK operator type.

    python benchmarks/bench_pte_op_types.py DIR [DIR ...] [--calls N] [--warmup N]

Each DIR holds one model's `*_int8.pte` and `*_fp32.pte`, as `toolchain bench --out OUT` writes
them (OUT/mobilefacenet, OUT/verifier, ...). Both files run N calls on one thread with ETDump on,
on a random input of the program's own shape; the table gives, per operator type (the event name
without its number and layout, e.g. `Convolution DWConv`), how many operators of that type each
file has and their summed median time per call, with the int8/fp32 ratio. `Method::execute` is the
runtime's own time for the whole call. Per-operator events cost a little time each, so their sum
exceeds `Method::execute`: compare the rows with each other, not with the total. The CPU and its
int8 features are printed with each table.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from toolchain.environment import describe_cpu
from toolchain.runtime.executorch_runner import etdump_times

# Runtime events (Method::execute, Program::load_method, ...) hold "::"; DELEGATE_CALL spans the partition.
_DELEGATE_SPAN = "DELEGATE_CALL"


def operator_type(event: str) -> str:
    """'Convolution (NHWC, QC8) DWConv #49' -> 'Convolution DWConv'."""
    name = re.sub(r"\s*#\d+$", "", event)
    name = re.sub(r"\s*\((?:NC|NHWC|ND)[^)]*\)", "", name)
    return " ".join(name.split())


def op_type_times(path: Path, calls: int, warmup: int) -> tuple[float, dict[str, tuple[int, float]]]:
    """-> (median Method::execute ms, {operator type: (operators, summed median ms per call)})."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    shape = tuple(method.metadata.input_tensor_meta(0).sizes())
    events = etdump_times(path, [torch.rand(shape)], warmup + calls)
    per_type: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, raw in events.items():
        if name == _DELEGATE_SPAN or "::" in name:
            continue
        # The Inspector merges same-named events: one per call after the warm-up.
        times = np.asarray(raw[len(raw) * warmup // (warmup + calls):])
        kind = operator_type(name)
        per_type[kind][0] += 1
        per_type[kind][1] += float(np.median(times))
    execute = float(np.median(events["Method::execute"][warmup:]))
    return execute, {k: (n, ms) for k, (n, ms) in per_type.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    console = Console()
    for folder in args.dirs:
        files = {p: sorted(folder.glob(f"*_{p}.pte")) for p in ("int8", "fp32")}
        if not all(files.values()):
            raise SystemExit(f"error: {folder} holds no *_int8.pte and *_fp32.pte pair")
        fp32_total, fp32 = op_type_times(files["fp32"][0], args.calls, args.warmup)
        int8_total, int8 = op_type_times(files["int8"][0], args.calls, args.warmup)
        table = Table(title=f"{folder.name}: Method::execute {int8_total:.3f} ms int8 / {fp32_total:.3f} ms fp32 "
                            f"= {int8_total / fp32_total:.2f} ({args.calls} calls, one thread)",
                      caption=describe_cpu())
        for col in ("operator type", "fp32 ops", "fp32 ms", "int8 ops", "int8 ms", "int8 / fp32"):
            table.add_column(col, justify="left" if col == "operator type" else "right")
        kinds = sorted(set(fp32) | set(int8), key=lambda k: -(fp32.get(k, (0, 0))[1] + int8.get(k, (0, 0))[1]))
        for kind in kinds:
            (nf, tf), (ni, ti) = fp32.get(kind, (0, 0.0)), int8.get(kind, (0, 0.0))
            table.add_row(kind, str(nf), f"{tf:.3f}", str(ni), f"{ti:.3f}", f"{ti / tf:.2f}" if tf > 0 and ni else "-")
        console.print(table)


if __name__ == "__main__":
    main()
