"""Export benchmark: sizes, single-thread int8/fp32 latency ratios and int8 parity, in one run.

    python benchmarks/bench_export.py [MODEL ...] [--out DIR] [--repeats N] [--pairs N] [--json FILE]

Same as `toolchain bench`. MODEL is a registry name (random init: the numbers measure the
export, not a trained model's accuracy), a checkpoint or an enrolled user folder. Default:
verifier, mobilefacenet, seesawfacenet, vargfacenet. Parity uses synthetic faces.
"""

from __future__ import annotations

import sys

from toolchain.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
