"""Malicious and corrupted .bin files are refused, and nothing they ask for runs."""

import os
import pickle
import pickletools

import numpy as np
import pytest

from toolchain.data import load_pairs
from toolchain.data.codec import encode_jpeg
from toolchain.data.insightface_bin import read_bin, safe_load
from toolchain.errors import ToolchainError


class _Payload:
    """Pickles to a call of `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _write(path, obj, protocol=4):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_payload_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    jpg = encode_jpeg(np.zeros((112, 112, 3), np.uint8))
    evil = _Payload(os.system, f"touch {marker}")
    path = _write(tmp_path / "evil.bin", ([jpg, evil], [True]), protocol)
    assert "system" in "".join(str(a) for _, a, _ in pickletools.genops(path.read_bytes()))  # really in there
    with pytest.raises(ToolchainError, match=r"unsafe pickle.*(posix|os)\.system"):
        load_pairs(path)
    assert not marker.exists()


@pytest.mark.parametrize("fn,args", [
    (eval, ("__import__('pathlib').Path('{m}').touch()",)),
    (exec, ("open('{m}', 'w').close()",)),
    (open, ("{m}", "w")),
    (__import__, ("os",)),
    (np.save, ("{m}", np.zeros(1))),
])
def test_any_other_global_is_refused(tmp_path, fn, args):
    marker = tmp_path / "marker"
    args = tuple(a.format(m=marker) if isinstance(a, str) else a for a in args)
    path = _write(tmp_path / "x.bin", ([b"a", _Payload(fn, *args)], [True]))
    with pytest.raises(ToolchainError, match="unsafe pickle"):
        read_bin(path)
    assert not marker.exists()
    assert not marker.with_suffix(".npy").exists()


def test_disallowed_numpy_payloads_are_refused():
    for obj in ([np.array([1.5])], [np.array([object()], dtype=object)],
                [np.zeros(2, dtype=[("a", "u1"), ("b", "u1")])]):
        with pytest.raises(ToolchainError, match="unsafe pickle"):
            safe_load(pickle.dumps((obj, [True]), protocol=4), "x.bin")


def test_corrupted_bins_are_refused(tmp_path):
    jpg = encode_jpeg(np.zeros((112, 112, 3), np.uint8))
    good = pickle.dumps(([jpg, jpg], [True]), protocol=4)
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00not a pickle at all",
        "wrong structure": pickle.dumps({"bins": [jpg]}, protocol=4),
        "odd image count": pickle.dumps(([jpg], [True]), protocol=4),
        "undecodable jpeg": pickle.dumps(([jpg, jpg[:200]], [True]), protocol=4),
        "not bytes": pickle.dumps(([1, 2], [True]), protocol=4),
    }
    for name, data in cases.items():
        (tmp_path / "c.bin").write_bytes(data)
        with pytest.raises(ToolchainError) as exc:
            read_bin(tmp_path / "c.bin")
        assert "c.bin" in str(exc.value) and "\n" not in str(exc.value), name
