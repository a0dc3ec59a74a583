"""Where a user's values sit in a converted file: a patch plan learned from two full exports.

The plan is learned, not hand-coded per format: two probe users are exported in full, and every
per-user value is encoded the ways a file may store it (raw int8/int32/float32 bytes, float64
constants, int64 zero-points, the sha256 hex key ExecuTorch names a data blob by). A value's
location is an offset where the first file holds the first user's encoding and the second file
the second user's. The plan is accepted only if those locations cover every byte in which the
two files differ, and if writing the second user's values into the first file reproduces the
second file exactly. Then writing user C's values into the template is C's full export, as long
as C's values have the same encoded length (they do: shapes are fixed) and do not change the
file's layout; `why_not_patchable` says when they would (flatbuffers omit a scalar equal to its
default, 0), and the caller falls back to a full export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from toolchain.errors import ToolchainError

PLAN_SCHEMA = "toolchain.fleet_patch_plan/1"


class PlanError(ToolchainError):
    """The two probe exports do not differ only in per-user values."""


def _find_all(haystack: bytes, needle: bytes) -> list[int]:
    out, start = [], 0
    while True:
        i = haystack.find(needle, start)
        if i < 0:
            return out
        out.append(i)
        start = i + 1


@dataclass
class PatchPlan:
    size: int  # bytes of every file of this template
    offsets: dict[str, list[int]]  # encoded value name -> where it is written
    lengths: dict[str, int]
    constants: dict[str, str] = field(default_factory=dict)  # name -> hex of a value both probes shared

    @classmethod
    def learn(cls, file_a: bytes, values_a: dict[str, bytes], file_b: bytes, values_b: dict[str, bytes]) -> "PatchPlan":
        if len(file_a) != len(file_b):
            raise PlanError(f"the probe users' files differ in length ({len(file_a)} and {len(file_b)} bytes): "
                            "their layout depends on the user")
        a, b = np.frombuffer(file_a, np.uint8), np.frombuffer(file_b, np.uint8)
        covered = np.zeros(len(a), bool)
        offsets, lengths, constants = {}, {}, {}
        for name, va in values_a.items():
            vb = values_b[name]
            if len(va) != len(vb):
                raise PlanError(f"value {name} has encodings of different lengths")
            if va == vb:
                if file_a.find(va) >= 0:
                    constants[name] = va.hex()  # present, equal for both probes: it must stay so
                continue
            found = [o for o in _find_all(file_a, va) if file_b[o:o + len(vb)] == vb]
            if found:
                offsets[name], lengths[name] = found, len(va)
                for o in found:
                    covered[o:o + len(va)] = True
        stray = np.flatnonzero((a != b) & ~covered)
        if len(stray):
            raise PlanError(f"{len(stray)} bytes differ between the probe users' files outside every per-user "
                            f"value (first at offset {int(stray[0])})")
        plan = cls(size=len(file_a), offsets=offsets, lengths=lengths, constants=constants)
        if plan.apply(file_a, values_b) != file_b:
            raise PlanError("writing the second probe user's values into the first file does not reproduce "
                            "the second file")
        return plan

    def why_not_patchable(self, values: dict[str, bytes], template_values: dict[str, bytes]) -> str | None:
        """None if `values` can be written in place of `template_values`, else the reason."""
        for name, hexval in self.constants.items():
            if values[name].hex() != hexval:
                return f"{name} differs from the template's and its place in the file is unknown"
        for name in self.offsets:
            new, old = values[name], template_values[name]
            if len(new) != self.lengths[name]:
                return f"{name} has another length"
            if (not any(new)) != (not any(old)):
                return f"{name} changes to or from zero, which changes the file's layout"
        return None

    def apply(self, template: bytes, values: dict[str, bytes]) -> bytes:
        if len(template) != self.size:
            raise ToolchainError(f"template has {len(template)} bytes, the plan expects {self.size}")
        buf = bytearray(template)
        for name, offs in self.offsets.items():
            v = values[name]
            for o in offs:
                buf[o:o + len(v)] = v
        return bytes(buf)

    def to_dict(self) -> dict:
        return {"schema": PLAN_SCHEMA, "size": self.size, "offsets": self.offsets, "lengths": self.lengths,
                "constants": self.constants}

    @classmethod
    def from_dict(cls, d: dict) -> "PatchPlan":
        if d.get("schema") != PLAN_SCHEMA:
            raise ToolchainError(f"patch plan: unknown schema {d.get('schema')!r}")
        return cls(size=int(d["size"]), offsets={k: [int(o) for o in v] for k, v in d["offsets"].items()},
                   lengths={k: int(v) for k, v in d["lengths"].items()}, constants=dict(d.get("constants", {})))
