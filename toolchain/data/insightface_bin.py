"""insightface verification `.bin` files, read without executing anything they ask for.

A `.bin` is a pickle of `(bins, issame_list)` (written by Python 2, hence encoding='bytes'):
`bins` holds 2N encoded images (bytes, or 1-D uint8 numpy arrays), pair k is bins[2k],
bins[2k+1]; `issame_list` holds N booleans (a list, or a numpy bool array).

A pickle can call any importable function while loading. These files come from strangers, so
`_SafeUnpickler.find_class` refuses every global except the handful numpy needs to rebuild a
uint8/bool array (and `_codecs.encode`, which Python 3 protocol-2 pickles use for bytes), and it
hands back guarded stand-ins, not the real functions: the stand-ins accept only uint8/bool
dtypes and plain ndarrays. Anything else raises before the pickle can call it.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from toolchain.data.codec import decode_image
from toolchain.data.pairs import VerificationPairs
from toolchain.errors import ToolchainError

_ALLOWED_DTYPES = {np.dtype(np.uint8), np.dtype(np.bool_)}


class UnsafePickleError(ToolchainError):
    pass


class _Dtype:
    """Stand-in for numpy.dtype while unpickling: only uint8/bool, no fields, state ignored.

    (Returning the real np.dtype would let the pickle call __setstate__ on numpy's shared
    singleton dtype objects.)"""

    def __init__(self, obj, align=False, copy=True):
        if isinstance(obj, bytes):
            obj = obj.decode("latin-1")
        if not isinstance(obj, str):
            raise UnsafePickleError(f"numpy dtype from a {type(obj).__name__} is not allowed")
        try:
            dt = np.dtype(obj)
        except TypeError:
            raise UnsafePickleError(f"unknown numpy dtype {obj!r}") from None
        if dt not in _ALLOWED_DTYPES:
            raise UnsafePickleError(f"numpy dtype {dt} is not allowed (only uint8 and bool)")
        self.dtype = dt

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): a plain
        # uint8/bool dtype has no subarray, names or fields.
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise UnsafePickleError("structured or sub-array dtypes are not allowed")


def _real_dtype(dt) -> np.dtype:
    if isinstance(dt, _Dtype):
        return dt.dtype
    raise UnsafePickleError(f"expected a numpy dtype, got {type(dt).__name__}")


class _NdarrayMarker:
    """Stands in for numpy.ndarray: only _reconstruct accepts it; it builds nothing itself."""

    __slots__ = ()


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not _NdarrayMarker:
        raise UnsafePickleError("only plain numpy arrays may be rebuilt")
    arr = np.ndarray.__new__(np.ndarray, shape, np.uint8)
    return _GuardedArray(arr)


class _GuardedArray:
    """Stands in for the array while the pickle sets its state; refuses non-uint8/bool data."""

    def __init__(self, arr):
        self.arr = arr

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("malformed numpy array state")
        state = list(state)
        k = 2 if len(state) == 5 else 1
        state[k] = _real_dtype(state[k])
        if not isinstance(state[-1], (bytes, bytearray)):
            raise UnsafePickleError("numpy array data must be raw bytes (object arrays are refused)")
        shape = state[k - 1]
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UnsafePickleError("malformed numpy array shape")
        if int(np.prod(shape, dtype=np.int64)) * state[k].itemsize != len(state[-1]):
            raise UnsafePickleError("numpy array data does not match its shape")
        self.arr.__setstate__(tuple(state))


def _frombuffer(buf, dtype, shape, order):
    dtype = _real_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        raise UnsafePickleError("malformed numpy buffer")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _scalar(dtype, data):
    dtype = _real_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed for latin-1 byte strings")
    return obj.encode("latin-1")


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = _SAFE_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"refuses to load global {module}.{name} (only numpy uint8/bool arrays "
                                    f"and bytes are allowed in a .bin)")
        return fn

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not allowed")


def safe_load(data: bytes, what: str):
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise ToolchainError(f"{what}: unsafe pickle: {exc}") from None
    except ToolchainError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"{what}: not a valid .bin pickle ({type(exc).__name__}: {exc})") from None
    return _unwrap(obj)


def _unwrap(obj):
    if isinstance(obj, _GuardedArray):
        return obj.arr
    if isinstance(obj, tuple):
        return tuple(_unwrap(o) for o in obj)
    if isinstance(obj, list):
        return [_unwrap(o) for o in obj]
    return obj


def read_bin_raw(path) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, issame) of a .bin without decoding the images."""
    p = Path(path)
    if not p.is_file():
        raise ToolchainError(f"{p}: no such file")
    obj = safe_load(p.read_bytes(), p.name)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ToolchainError(f"{p.name}: expected a pickle of (bins, issame_list)")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise ToolchainError(f"{p.name}: bins must be a list, got {type(bins).__name__}")
    out = []
    for k, b in enumerate(bins):
        if isinstance(b, (bytes, bytearray)):
            out.append(bytes(b))
        elif isinstance(b, np.ndarray) and b.dtype == np.uint8:
            out.append(b.tobytes())
        else:
            raise ToolchainError(f"{p.name}: bins[{k}] is a {type(b).__name__}, not encoded image bytes")
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)) or not all(isinstance(x, (bool, np.bool_, int)) for x in issame):
        raise ToolchainError(f"{p.name}: issame_list must be a list of booleans")
    issame = np.asarray(issame, dtype=bool)
    if len(out) != 2 * len(issame):
        raise ToolchainError(f"{p.name}: {len(out)} images for {len(issame)} pairs (needs 2 per pair)")
    return out, issame


def read_bin(path, progress=None) -> VerificationPairs:
    """Read and decode an insightface .bin into VerificationPairs (name = file stem)."""
    p = Path(path)
    bins, issame = read_bin_raw(p)
    n = len(issame)
    images = np.empty((2 * n, 112, 112, 3), dtype=np.uint8)
    for k, b in enumerate(bins):
        images[k] = decode_image(b, f"{p.name}: image {k}")
        if progress is not None:
            progress(1)
    return VerificationPairs(images[0::2], images[1::2], issame, name=p.stem)


def write_bin(path, jpegs, issame) -> None:
    """Write `(bins, issame_list)` as insightface does: bins are bytes, issame a list of bools.

    Protocol 4 (any Python 3 reads it; insightface's loaders call pickle.load(f, encoding='bytes')).
    """
    p = Path(path)
    bins = [bytes(b) for b in jpegs]
    issame = [bool(x) for x in issame]
    if len(bins) != 2 * len(issame):
        raise ToolchainError(f"{len(bins)} images for {len(issame)} pairs (needs 2 per pair)")
    tmp = p.with_name(p.name + ".partial")
    with open(tmp, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    os.replace(tmp, p)
