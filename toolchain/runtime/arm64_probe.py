"""Runs inside the emulated aarch64 Python (toolchain.runtime.arm64): only numpy and LiteRT.

    python3.11 arm64_probe.py MODEL.tflite INPUTS.npy OUTPUTS.npy

INPUTS holds the model's input tensors, already quantised, stacked on axis 0; each is run alone
(the artifacts have batch 1) on one thread with LiteRT's default XNNPACK delegate, and the raw
output tensors are saved stacked, unconverted. One line of JSON on stdout says where it ran.
"""

import json
import platform
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def main(model: str, inputs: str, outputs: str) -> None:
    interpreter = Interpreter(model_path=model, num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    x = np.load(inputs)
    ys = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None].astype(inp["dtype"]))
        interpreter.invoke()
        ys.append(interpreter.get_tensor(out["index"])[0].copy())
    tmp = outputs + ".tmp.npy"
    np.save(tmp, np.stack(ys))
    import os

    os.replace(tmp, outputs)
    print(json.dumps({"machine": platform.machine(), "numpy": np.__version__, "count": len(ys)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
