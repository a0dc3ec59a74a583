"""toolchain.runtime.amx: `bench --no-amx` refuses AMX to its process, and only the speed changes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from toolchain.runtime import amx

pytestmark = pytest.mark.skipif(not amx._supported(), reason="AMX permission exists on Linux x86-64 only")

_REQUEST = ("import ctypes; from toolchain.runtime import amx; "
            "r = amx._libc().syscall(amx._SYS_ARCH_PRCTL, amx._ARCH_REQ_XCOMP_PERM, amx._XFEATURE_XTILEDATA); "
            "print(r, ctypes.get_errno() if r else 0)")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("\n")[-2]


def test_the_request_gets_eperm_after_deny_amx():
    # EPERM is the filter's answer; a CPU without AMX would say EINVAL, one with it 0.
    assert _python(f"from toolchain.runtime.amx import deny_amx; deny_amx(); {_REQUEST}") == "-1 1"


def test_deny_amx_after_a_grant_is_a_clear_error():
    if _python(_REQUEST) != "0 0":
        pytest.skip("this CPU grants no AMX")
    out = _python(f"{_REQUEST}\nfrom toolchain.errors import ToolchainError\nfrom toolchain.runtime.amx import deny_amx\n"
                  "try:\n    deny_amx()\nexcept ToolchainError as e:\n    print('refused:', e)")
    assert out.startswith("refused: --no-amx: this process already holds AMX permission")


def test_litert_int8_outputs_are_the_same_without_amx(tmp_path):
    tf = pytest.importorskip("tensorflow")
    # A small int8 conv net: the GEMM and conv kernels XNNPACK picks by CPU feature.
    inputs = tf.keras.Input((16, 16, 8), batch_size=1)
    x = tf.keras.layers.Conv2D(32, 3, activation="relu")(inputs)
    x = tf.keras.layers.Conv2D(64, 1)(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(16)(tf.keras.layers.Flatten()(x)))
    rng = np.random.default_rng(0)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.normal(size=(1, 16, 16, 8)).astype(np.float32)] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path = tmp_path / "net_int8.tflite"
    path.write_bytes(converter.convert())
    np.save(tmp_path / "x.npy", rng.integers(-128, 128, size=(4, 1, 16, 16, 8), dtype=np.int8))
    run = ("import numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\n"
           f"it = Interpreter(model_path={str(path)!r}, num_threads=1); it.allocate_tensors()\n"
           f"outs = []\nfor x in np.load({str(tmp_path / 'x.npy')!r}):\n"
           "    it.set_tensor(it.get_input_details()[0]['index'], x); it.invoke()\n"
           "    outs.append(it.get_tensor(it.get_output_details()[0]['index']).astype(int).ravel())\n"
           "print(np.concatenate(outs).tolist())")
    allowed = _python(run)
    denied = _python("from toolchain.runtime.amx import deny_amx; deny_amx()\n" + run)
    assert allowed == denied and len(set(json.loads(allowed))) > 1
