"""The patch plan: learned from two files, it writes any user's values, and refuses what it cannot."""

import numpy as np
import pytest

from toolchain.fleet.patch import PatchPlan, PlanError


def _file(rng_seed: int, values: dict[str, bytes], layout: dict[str, int], size: int = 400) -> bytes:
    base = bytearray(np.random.default_rng(123).integers(0, 256, size, dtype=np.uint8).tobytes())
    for name, off in layout.items():
        base[off:off + len(values[name])] = values[name]
    return bytes(base)


def _values(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {"w": rng.integers(-127, 128, 32, dtype=np.int8).tobytes(), "s": np.float32(rng.random()).tobytes(),
            "zp": np.int32(rng.integers(1, 100)).tobytes(), "unused": b"never in the file"}


LAYOUT = {"w": 40, "s": 100, "zp": 200}


def test_learn_then_write_a_third_user():
    a, b, c = _values(1), _values(2), _values(3)
    fa, fb, fc = (_file(0, v, LAYOUT) for v in (a, b, c))
    plan = PatchPlan.learn(fa, a, fb, b)
    assert plan.offsets == {"w": [40], "s": [100], "zp": [200]}
    assert plan.apply(fa, c) == fc
    assert plan.why_not_patchable(c, a) is None
    assert PatchPlan.from_dict(plan.to_dict()).apply(fa, c) == fc


def test_a_value_written_twice_is_patched_twice():
    a, b, c = _values(1), _values(2), _values(3)
    layout2 = {**LAYOUT}
    fa, fb, fc = (bytearray(_file(0, v, layout2)) for v in (a, b, c))
    for f, v in ((fa, a), (fb, b), (fc, c)):
        f[300:332] = v["w"]  # e.g. a blob and a copy of it
    plan = PatchPlan.learn(bytes(fa), a, bytes(fb), b)
    assert plan.offsets["w"] == [40, 300]
    assert plan.apply(bytes(fa), c) == bytes(fc)


def test_bytes_that_differ_outside_every_value_refuse_a_plan():
    a, b = _values(1), _values(2)
    fa, fb = _file(0, a, LAYOUT), bytearray(_file(0, b, LAYOUT))
    fb[350] ^= 0xFF  # e.g. a timestamp the values do not explain
    with pytest.raises(PlanError, match="outside every per-user value"):
        PatchPlan.learn(fa, a, bytes(fb), b)
    with pytest.raises(PlanError, match="differ in length"):
        PatchPlan.learn(fa, a, bytes(fb) + b"x", b)


def test_zero_and_constant_values_are_not_patchable():
    a, b, c = _values(1), _values(2), _values(3)
    fa, fb = _file(0, a, LAYOUT), _file(0, b, LAYOUT)
    plan = PatchPlan.learn(fa, a, fb, b)
    zero = {**c, "zp": np.int32(0).tobytes()}  # a flatbuffer would omit it: another layout
    assert "zero" in plan.why_not_patchable(zero, a)
    # A value both probes shared has no known place: a user whose value differs cannot be patched.
    a2, b2 = {**a, "k": b"KONST"}, {**b, "k": b"KONST"}
    fa2, fb2 = bytearray(fa), bytearray(fb)
    fa2[250:255] = fb2[250:255] = b"KONST"
    plan2 = PatchPlan.learn(bytes(fa2), a2, bytes(fb2), b2)
    assert "k" in plan2.constants
    assert plan2.why_not_patchable({**c, "k": b"OTHER"}, a2) is not None
