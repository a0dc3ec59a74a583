"""How much work int8 saves on XNNPACK's ARM kernels: aarch64 instructions executed per `invoke()`
of each `.tflite`, int8 against fp32, counted under qemu's user-mode emulation.

    python benchmarks/bench_arm_instructions.py DIR [DIR ...] [--cpus max,cortex-a76,cortex-a53]
        [--invokes N] [--json FILE]

Each DIR holds one model's `*_int8.tflite` (or `*_int8_mixed.tflite`) and `*_fp32.tflite`:
`toolchain bench --out OUT` writes OUT/verifier, OUT/mobilefacenet, ...; a recipe run writes
RUN/export. Needs `make arm-env` (toolchain.runtime.arm64).

Phones run int8 on dot-product instructions (ARMv8.2 `sdot`; `smmla` with i8mm), which no machine
here has, and emulated time means nothing. What the emulator can say exactly is how many
instructions XNNPACK's aarch64 kernels execute. qemu's CPU model decides which kernels XNNPACK
picks: `max` has sdot and i8mm, `cortex-a76` sdot only, `cortex-a53` neither. For each file and CPU model the emulated LiteRT runs the
file once (warm-up: the delegate packs its weights), then N more times; qemu logs every
translated block (`-d in_asm`) and every block it executes (`-d exec,nochain`), restricted
(`-dfilter`) to LiteRT's own libraries, libstdc++, libc, libm and libgcc. Calls to libc's getpid()
mark where the N invokes start and end; the instructions between the marks, over N, are the
instructions per `invoke()` (the Python loop around it runs in the interpreter's own binary,
which is not logged). Instructions are not time: the count leaves out memory stalls and what
each instruction costs on a real core (a `sdot` does 16 multiply-adds, an `fmla` 4). The ARM
environment's LiteRT is 1.4.0 (2.x does not load under this qemu), so its XNNPACK is older than
the x86 one's.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolchain.runtime.arm64 import find_arm_env

# Runs in the emulated aarch64 Python. libc's getpid() marks where the counted invokes start and
# end in qemu's trace: nothing else calls it while LiteRT runs.
PROBE = """
import ctypes, os, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
model, n = sys.argv[1], int(sys.argv[2])
it = Interpreter(model_path=model, num_threads=1)
it.allocate_tensors()
inp = it.get_input_details()[0]
rng = np.random.default_rng(0)
x = rng.integers(-128, 128, inp["shape"]).astype(inp["dtype"]) if inp["dtype"] == np.int8 \\
    else rng.random(inp["shape"]).astype(inp["dtype"])
it.set_tensor(inp["index"], x)
it.invoke()
print(ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value)
print("".join(line for line in open("/proc/self/maps") if " r-xp " in line), flush=True)
os.getpid()
for _ in range(n):
    it.invoke()
os.getpid()
"""
# Where XNNPACK's kernels and what they call live (libc: memcpy and memset, and the marker).
LOGGED = ("/ai_edge_litert/", "libstdc++", "/libc.so", "/libm.so", "libgcc_s")

_INSN = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{8})\s")
# Executions of each block between the last two executions of the marker's block (startup may
# call getpid too; awk is fast on the trace's millions of lines). qemu prints the block's guest
# address 16 digits wide.
_COUNT_BETWEEN_MARKERS = r"""
/^Trace/ {
    split($0, f, "/")
    if (f[2] == marker) { seen++; delete last; for (pc in n) last[pc] = n[pc]; delete n; next }
    n[f[2]]++
}
END { for (pc in last) print pc, last[pc]; if (seen < 2) exit 3 }
"""


def kind(word: int) -> str:
    """The instruction classes the table counts, from the encoding (qemu 7.2's disassembler
    prints the dot-product and matrix instructions as `.byte`)."""
    if word & 0xBFE0FC00 in (0x0E809400, 0x2E809400) or word & 0xBFC0F400 in (0x0F80E000, 0x2F80E000):
        return "dot"  # SDOT / UDOT, vector or by element
    if word & 0xFFE0FC00 in (0x4E80A400, 0x6E80A400, 0x4E80AC00):
        return "mmla"  # SMMLA / UMMLA / USMMLA
    if word & 0xBFA0FC00 == 0x0E20CC00 or word & 0xBF80F400 == 0x0F801000:
        return "fmla"  # FMLA (vector, single precision), vector or by element
    return "other"


def logged_ranges(maps: str) -> str:
    """qemu's -dfilter argument: the executable mappings of the LOGGED libraries."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and any(lib in fields[5] for lib in LOGGED):
            lo, hi = fields[0].split("-")
            ranges.append(f"0x{lo}..0x{int(hi, 16) - 1:x}")
    if not ranges:
        raise SystemExit("error: the emulated process maps none of LiteRT's libraries")
    return ",".join(ranges)


def translated_blocks(log: Path) -> dict[int, collections.Counter]:
    """Each translated block's instructions by kind, keyed by its guest address (`-d in_asm`)."""
    blocks: dict[int, collections.Counter] = {}
    current: collections.Counter | None = None
    start = None
    grep = subprocess.Popen(["grep", "-v", "^Trace", str(log)], stdout=subprocess.PIPE, text=True, errors="replace")
    for line in grep.stdout:
        if line.startswith("IN:"):
            current, start = collections.Counter(), None
            continue
        if current is not None:
            m = _INSN.match(line)
            if m:
                start = int(m.group(1), 16) if start is None else start
                current[kind(int(m.group(2), 16))] += 1
                continue
            if start is not None:
                blocks[start] = current
            current = None
    grep.wait()
    return blocks


def per_invoke(model: Path, cpu: str, invokes: int) -> dict:
    """Instructions per invoke (total and by kind) of `model` on qemu CPU model `cpu`."""
    env = find_arm_env()
    with tempfile.TemporaryDirectory(prefix="toolchain-armcount-") as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(PROBE)

        def run(n: int, qemu_args: list[str]) -> str:
            cmd = [str(env.qemu), "-cpu", cpu, *qemu_args, "-L", str(env.sysroot), str(env.python),
                   str(probe), str(model.resolve()), str(n)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env.process_env(), timeout=7200)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise SystemExit(f"error: {model.name} on {cpu}: the emulated run failed: {tail}")
            return done.stdout

        layout = run(0, [])  # where the libraries and the marker are, for the filter
        log = Path(tmp) / "exec.log"
        if run(invokes, ["-d", "in_asm,exec,nochain", "-dfilter", logged_ranges(layout), "-D", str(log)]) != layout:
            raise SystemExit(f"error: {model.name} on {cpu}: the libraries moved between runs")
        marker = f"{int(layout.split()[0]):016x}"
        counted = subprocess.run(["awk", "-v", f"marker={marker}", _COUNT_BETWEEN_MARKERS, str(log)],
                                 capture_output=True, text=True)
        if counted.returncode != 0:
            raise SystemExit(f"error: {model.name} on {cpu}: the trace does not hold both markers")
        blocks = translated_blocks(log)
    total: collections.Counter = collections.Counter()
    for line in counted.stdout.splitlines():
        pc, times = line.split()
        for k, v in blocks[int(pc, 16)].items():
            total[k] += v * int(times)
    per = {k: total[k] / invokes for k in ("dot", "mmla", "fmla", "other")}
    return {"instructions": sum(per.values()), **per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--cpus", default="max,cortex-a76,cortex-a53", help="qemu CPU models")
    ap.add_argument("--invokes", type=int, default=2, help="invokes counted after the warm-up")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 160)
    rows = []
    for folder in args.dirs:
        files = {p: sorted(folder.glob(f"*_{p}*.tflite")) for p in ("int8", "fp32")}  # *_int8_mixed too
        if not all(files.values()):
            raise SystemExit(f"error: {folder} holds no *_int8.tflite and *_fp32.tflite pair")
        for cpu in args.cpus.split(","):
            row = {"model": folder.name, "cpu": cpu}
            for precision, paths in files.items():
                row[precision] = per_invoke(paths[0], cpu, args.invokes)
                console.print(f"{folder.name} {precision} on {cpu}: {row[precision]['instructions']:,.0f} instructions")
            rows.append(row)
    table = Table(title="aarch64 instructions per invoke() in LiteRT's XNNPACK, counted under qemu "
                        f"(mean of {args.invokes} invokes after a warm-up)",
                  caption="dot: sdot/udot; mmla: smmla (i8mm); fmla: float multiply-add. Instructions, not time.")
    for col in ("model", "qemu CPU", "int8 instructions", "fp32 instructions", "int8 / fp32",
                "int8 dot + mmla", "fp32 fmla"):
        table.add_column(col, justify="left" if col in ("model", "qemu CPU") else "right")
    for r in rows:
        i8, f32 = r["int8"], r["fp32"]
        table.add_row(r["model"], r["cpu"], f"{i8['instructions']:,.0f}", f"{f32['instructions']:,.0f}",
                      f"{i8['instructions'] / f32['instructions']:.2f}",
                      f"{i8['dot'] + i8['mmla']:,.0f}", f"{f32['fmla']:,.0f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
