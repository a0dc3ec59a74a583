"""Atomic file writes: a temporary name in the same folder, then a rename.

Readers (and a run interrupted half-way) never see a partial file. No heavy imports: the
pipeline's bookkeeping and `toolchain check` use this without pulling in torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write_bytes(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)` then rename into place, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Pretty, sorted JSON (non-JSON values as strings), written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
