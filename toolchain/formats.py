"""The file identifiers of the artifact formats: a cheap check that a file is what its suffix
says, before a runtime parses it.

Both formats are flatbuffers, whose bytes 4-8 hold the schema's file identifier: `ET` and two
digits for an ExecuTorch program (`ET12` today), `TFL3` for a TFLite model. ExecuTorch's loader
aborts the whole process on some random bytes (a C++ `terminate` from its Python bindings, no
error to catch), so an artifact is checked here first. No heavy imports.
"""

from __future__ import annotations

import re
from pathlib import Path

from toolchain.errors import ToolchainError

_IDENTIFIERS = {".pte": (re.compile(rb"ET\d\d"), "an ExecuTorch program (.pte)"),
                ".tflite": (re.compile(rb"TFL3"), "a TFLite model (.tflite)")}


def check_identifier(path: str | Path) -> None:
    """Raise a one-line ToolchainError when a .pte or .tflite file lacks its format's file
    identifier; other suffixes are not checked."""
    path = Path(path)
    expected = _IDENTIFIERS.get(path.suffix.lower())
    if expected is None:
        return
    pattern, what = expected
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ToolchainError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(head) < 8 or not pattern.fullmatch(head[4:8]):
        found = f"the file is {len(head)} bytes long" if len(head) < 8 else f"bytes 4-8 are {head[4:8]!r}"
        raise ToolchainError(f"{path}: not {what}: its file identifier is missing ({found})")
