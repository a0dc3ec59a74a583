"""In-runtime latency of recipe runs' int8 files against their fp32 files, in one interleaved run.

    python benchmarks/bench_run_latency.py RUN [RUN ...] [--rounds 5] [--repeats 100] [--json FILE] [--no-amx]

RUN: a run folder (`toolchain run RECIPE --out RUN`, or one `seed-N` folder of
benchmarks/bench_recipe_seeds.py) whose `export/` holds int8 and fp32 files of each format.
Where `toolchain bench` times all-int8 files of freshly exported random-init models, this times
the files a recipe shipped: with the float blocks its fallback kept to meet the parity bounds.

Every file is timed inside its runtime, one thread, the files taken in turn within each round
(toolchain.export.bench.interleaved_latency: ETDump's `Method::execute` for a `.pte`, LiteRT's
`invoke()` less a one-op model's for a `.tflite`). Prints each int8 file's median, its run's
fp32 file of the same format, their ratio and the lowest and highest ratio of a single round,
with the CPU and its int8 features. `--no-amx` denies the process Intel AMX first, as `toolchain
bench --no-amx` does (toolchain.runtime.amx): LiteRT's XNNPACK then runs a VNNI CPU's kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolchain.environment import cpu_facts, describe_cpu
from toolchain.errors import ToolchainError
from toolchain.export.bench import interleaved_latency, target_ratio

FORMATS = (".pte", ".tflite")


def run_files(run: Path) -> dict[str, dict[str, Path]]:
    """{format suffix: {"int8": file, "fp32": file}} of a run's export folder; raises SystemExit
    with one line when a format lacks either precision."""
    export = run / "export"
    found: dict[str, dict[str, Path]] = {}
    for ext in FORMATS:
        int8 = sorted(export.glob(f"*_int8*{ext}"))
        fp32 = sorted(export.glob(f"*_fp32{ext}"))
        if int8 and fp32:
            found[ext] = {"int8": int8[0], "fp32": fp32[0]}
    if not found:
        raise SystemExit(f"error: {export} holds no int8 and fp32 file of one format")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-amx", action="store_true", help="deny this process Intel AMX (Linux x86-64)")
    args = ap.parse_args(argv)
    files = {run: run_files(run) for run in args.runs}
    paths = {f"{run}|{ext}|{p}": f for run, by_ext in files.items() for ext, pair in by_ext.items()
             for p, f in pair.items()}
    try:
        if args.no_amx:  # before any runtime starts and asks for AMX
            from toolchain.runtime.amx import deny_amx
            deny_amx()
        measured = interleaved_latency(paths, args.repeats, args.rounds)
    except ToolchainError as exc:  # AMX already granted, or a file its runtime cannot time
        raise SystemExit(f"error: {exc}")
    facts = cpu_facts() | ({"amx": "denied"} if args.no_amx else {})
    cpu, target = describe_cpu(facts), target_ratio(facts)
    table = Table(title=f"int8 against fp32, in the runtime, one thread: {cpu}")
    for col in ("run", "file", "int8 / fp32 (ms)", "int8 / fp32", "one round's range", f"target (<= {target:g})"):
        table.add_column(col)
    rows = []
    for run, by_ext in files.items():
        for ext, pair in by_ext.items():
            a, b = (measured[f"{run}|{ext}|{p}"] for p in ("int8", "fp32"))
            ms_a, ms_b = (m["runtime_ms"] if m.get("runtime_ms") is not None else m["wall_ms"] for m in (a, b))
            ratios = [x / y for x, y in zip(a["rounds_ms"], b["rounds_ms"])]
            rows.append({"run": str(run), "int8": pair["int8"].name, "fp32": pair["fp32"].name, "int8_ms": ms_a,
                         "fp32_ms": ms_b, "ratio": ms_a / ms_b, "round_range": [min(ratios), max(ratios)],
                         "source": a["source"]})
            table.add_row(run.name, pair["int8"].name, f"{ms_a:.3f} / {ms_b:.3f}", f"{ms_a / ms_b:.2f}",
                          f"{min(ratios):.2f}-{max(ratios):.2f}", "met" if ms_a / ms_b <= target else "missed")
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "target": target, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
