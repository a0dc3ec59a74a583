"""benchmarks/bench_arm_instructions.py: the instruction classes, the count between the markers,
and, where the ARM environment is built, a tiny verifier's int8 file on XNNPACK's aarch64 kernels
with and without dot products."""

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest

from toolchain.errors import ToolchainError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_arm_instructions",
                                                  ROOT / "benchmarks" / "bench_arm_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("word, kind", [
    (0x4E829420, "dot"),  # sdot v0.4s, v1.16b, v2.16b
    (0x6E829420, "dot"),  # udot v0.4s, v1.16b, v2.16b
    (0x4F80E020, "dot"),  # sdot v0.4s, v1.16b, v0.4b[0]
    (0x4E8DA56F, "mmla"),  # smmla v15.4s, v11.16b, v13.16b (from a trace of an int8 file)
    (0x4E22CC20, "fmla"),  # fmla v0.4s, v1.4s, v2.4s
    (0x4F821020, "fmla"),  # fmla v0.4s, v1.4s, v2.s[0]
    (0x4EA28420, "other"),  # add v0.4s, v1.4s, v2.4s
    (0xA9BF7BFD, "other"),  # stp x29, x30, [sp, #-16]!
])
def test_instruction_classes_come_from_the_encoding(bench, word, kind):
    assert bench.kind(word) == kind


def test_only_the_blocks_between_the_last_two_markers_count(bench, tmp_path):
    marker = "0000005500aaa000"

    def trace(pc):
        return f"Trace 0: 0x7f00 [0000000001009b31/{pc}/00000001/00080200] \n"

    log = tmp_path / "exec.log"
    log.write_text("IN: \n0x5500aaa000:  d2800000  mov x0, #0\n\n"
                   + trace("0000005500bbb000")  # startup, before any marker
                   + trace(marker) + trace("0000005500bbb000") * 2 + trace("0000005500ccc000")
                   + trace(marker) + trace("0000005500ddd000"))  # interpreter exit
    done = subprocess.run(["awk", "-v", f"marker={marker}", bench._COUNT_BETWEEN_MARKERS, str(log)],
                          capture_output=True, text=True, check=True)
    assert sorted(done.stdout.split("\n")[:-1]) == ["0000005500bbb000 2", "0000005500ccc000 1"]
    log.write_text(trace(marker) + trace("0000005500bbb000"))
    one = subprocess.run(["awk", "-v", f"marker={marker}", bench._COUNT_BETWEEN_MARKERS, str(log)],
                         capture_output=True, text=True)
    assert one.returncode == 3  # a trace cut short is an error, not a count


def test_the_filter_covers_only_the_libraries_it_names(bench):
    maps = ("400000-916000 r-xp 00000000 fe:00 1 /sysroot/usr/bin/python3.11\n"
            "55009a0000-5500b2c000 r-xp 00000000 fe:00 2 /sysroot/lib/aarch64-linux-gnu/libc.so.6\n"
            "5501470000-5502885000 r-xp 00000000 fe:00 3 /site/numpy.libs/libscipy_openblas64_.so\n"
            "5507d54000-5508415000 r-xp 00294000 fe:00 4 /site/ai_edge_litert/libpywrap_litert_common.so\n")
    assert bench.logged_ranges(maps) == "0x55009a0000..0x5500b2bfff,0x5507d54000..0x5508414fff"


@pytest.mark.slow
def test_a_verifier_int8_file_runs_on_dot_products_only_where_the_cpu_has_them(bench, tmp_path,
                                                                              enrolled_random_verifier):
    from toolchain.cli import main
    from toolchain.runtime.arm64 import find_arm_env

    try:
        find_arm_env()
    except ToolchainError as exc:
        pytest.skip(f"ARM environment not built, so the emulated run is not tested here: {exc}")
    _, user, _ = enrolled_random_verifier(tmp_path, -0.05)
    assert main(["export", str(user), "--out", str(tmp_path / "out"), "--formats", "tflite", "--precisions",
                 "int8", "--calibration", str(tmp_path / "calib.npy"), "--calibration-size", "8"]) == 0
    model = tmp_path / "out" / "verifier_int8.tflite"
    with_dot = bench.per_invoke(model, "cortex-a76", invokes=1)
    without = bench.per_invoke(model, "cortex-a53", invokes=1)
    assert with_dot["dot"] > 0
    assert without["dot"] == without["mmla"] == 0
    assert without["instructions"] > with_dot["instructions"] > 10_000
    assert np.isclose(with_dot["instructions"], sum(with_dot[k] for k in ("dot", "mmla", "fmla", "other")))
