"""Deny this process Intel AMX, so that XNNPACK runs its AVX512-VNNI int8 kernels instead.

On Linux a process must ask the kernel for AMX's tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`) before it may use the tiles. XNNPACK asks when it starts, and if the
kernel refuses, it leaves AMX out and picks its other x86 kernels (XNNPACK
src/configs/hardware-config.c). LiteRT's XNNPACK runs small int8 layers more slowly with AMX
than with AVX512-VNNI on the Intel Xeon measured in the README, and phones have no AMX. So
`toolchain bench --no-amx` measures, on an AMX CPU, the int8 path of a VNNI CPU without AMX.

The refusal is a seccomp filter that answers that one request with EPERM. It holds for the
rest of the process and its children. It must be installed before anything has asked: a
permission already granted cannot be taken back, and `deny_amx` then says so.
"""

from __future__ import annotations

import ctypes
import platform
import struct
import sys

from toolchain.errors import ToolchainError

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
# struct seccomp_data: nr (u32) at 0, arch (u32) at 4, instruction pointer at 8, args[0] at 16.
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _supported() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def amx_permitted() -> bool:
    """Whether this process may use AMX's tile data now (False off Linux x86-64)."""
    if not _supported():
        return False
    mask = ctypes.c_uint64(0)
    if _libc().syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return False  # a kernel without the call (before 5.16) has no AMX for anyone
    return bool(mask.value >> _XFEATURE_XTILEDATA & 1)


def _filter() -> bytes:
    """BPF: arch_prctl(ARCH_REQ_XCOMP_PERM, ...) gets EPERM; every other call goes through."""
    def stmt(code, k):
        return struct.pack("HBBI", code, 0, 0, k)

    def jump(k, if_equal, otherwise):
        return struct.pack("HBBI", _JEQ_K, if_equal, otherwise, k)

    return b"".join([
        stmt(_LD_W_ABS, 4), jump(_AUDIT_ARCH_X86_64, 1, 0), stmt(_RET_K, _RET_ALLOW),
        stmt(_LD_W_ABS, 0), jump(_SYS_ARCH_PRCTL, 1, 0), stmt(_RET_K, _RET_ALLOW),
        stmt(_LD_W_ABS, 16), jump(_ARCH_REQ_XCOMP_PERM, 0, 1), stmt(_RET_K, _RET_EPERM),
        stmt(_RET_K, _RET_ALLOW),
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def deny_amx() -> None:
    """Refuse AMX to this process from now on. Raises ToolchainError off Linux x86-64, when
    AMX was already granted, or when the kernel refuses the filter."""
    if not _supported():
        raise ToolchainError(f"--no-amx: AMX exists only on x86-64 Linux here, not {sys.platform} "
                             f"{platform.machine()}")
    if amx_permitted():
        raise ToolchainError("--no-amx: this process already holds AMX permission; it cannot be withdrawn")
    libc = _libc()
    program = ctypes.create_string_buffer(_filter())
    fprog = _SockFprog(len(program.raw) // 8, ctypes.cast(program, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise ToolchainError(f"--no-amx: the kernel refused the seccomp filter (errno {ctypes.get_errno()})")
    # The program buffer must outlive the call only; the kernel keeps its own copy.
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        raise ToolchainError("--no-amx: the AMX request still succeeds under the filter")
