"""Facts about the machine and the installed stack: what a latency or a failure depends on.

int8 speed depends on the CPU's int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX on
x86, `asimddp`/sdot on ARM), so every report that shows a latency names them. The pins come from
the installed package's own requirements (pyproject.toml) and from `requirements-nodeps.txt`
beside the source, the two install steps of the Makefile.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import sys
from pathlib import Path

# /proc/cpuinfo flag -> the name reports use, in the order they are listed.
_X86_INT8 = {"avx2": "AVX2", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
_ARM_INT8 = {"asimddp": "sdot (asimddp)", "i8mm": "i8mm"}
# The stack a recipe needs: distribution names whose version `doctor` checks against the pins.
STACK = ("torch", "executorch", "torchao", "tensorflow-cpu", "ai-edge-litert", "onnx2tf", "litert-torch")
_NODEPS_FILE = "requirements-nodeps.txt"


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """{"model", "arch", "cores", "int8_features": [...], "int8_dot": bool} of this CPU."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    arch = platform.machine() or "unknown"
    table = _ARM_INT8 if arch in ("aarch64", "arm64") or "asimd" in flags else _X86_INT8
    features = [name for flag, name in table.items() if flag in flags]
    return {"model": model or platform.processor() or "unknown CPU", "arch": arch, "cores": os.cpu_count(),
            "int8_features": features,
            "int8_dot": any(f != "AVX2" for f in features)}


def describe_cpu(facts: dict | None = None) -> str:
    """One line for tables and reports: model, architecture and int8 features."""
    facts = facts or cpu_facts()
    feats = ", ".join(facts["int8_features"]) or "no int8 dot-product instructions"
    line = f"{facts['model']} ({facts['arch']}, {facts['cores']} cores; {feats})"
    if facts.get("amx") == "denied":  # toolchain.runtime.amx: XNNPACK ran its non-AMX kernels
        line += "; AMX denied to this process" if "AMX-INT8" in facts["int8_features"] else \
            "; --no-amx (this CPU has no AMX: nothing changed)"
    return line


def cuda_devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _requirement_pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s,]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def pinned_versions() -> dict[str, str]:
    """{distribution: pinned version} from the package metadata and requirements-nodeps.txt."""
    try:
        pins = _requirement_pins(importlib.metadata.requires("toolchain") or [])
    except importlib.metadata.PackageNotFoundError:
        pins = {}
    nodeps = Path(__file__).resolve().parents[1] / _NODEPS_FILE
    if nodeps.is_file():
        pins.update(_requirement_pins(nodeps.read_text().splitlines()))
    return pins


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def disk_free_gb(path: str | Path) -> float:
    """Free space where `path` is (or would be) created, in GB."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 1e9


def environment_facts() -> dict:
    """What the run manifest records: the machine that produced its numbers."""
    return {"cpu": cpu_facts(), "cuda": cuda_devices(), "python": sys.version.split()[0],
            "platform": platform.platform()}
