"""`toolchain check DIR`: re-verify a finished run, for CI.

Checks, from DIR/manifest.json alone (no model is rebuilt): every artifact is present with the
recorded size and sha256; every budget holds (file-size budgets are re-measured on the files);
every parity bound recorded by the run held.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from toolchain.errors import CheckFailed, ToolchainError
from toolchain.pipeline.core import sha256_file
from toolchain.pipeline.manifest import MANIFEST


@dataclass
class CheckRow:
    """One verdict, shaped like the profiler's BudgetResult (name, value, limit, passed)."""

    name: str
    value: Optional[float]
    limit: Optional[float]
    passed: bool
    compare: str = "<="  # "<=" a maximum, ">=" a minimum, "==" must equal
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _load_manifest(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise ToolchainError(f"{run_dir}: no such run folder")
    path = run_dir / MANIFEST
    if not path.is_file():
        raise ToolchainError(f"{path}: no manifest (is {run_dir} the --out folder of a finished `toolchain run`?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolchainError(f"{path}: malformed manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ToolchainError(f"{path}: malformed manifest (not a JSON object)")
    for key, typ in (("artifacts", list), ("budgets", list)):
        if not isinstance(manifest.get(key), typ):
            raise ToolchainError(f"{path}: malformed manifest (missing or invalid '{key}')")
    for i, a in enumerate(manifest["artifacts"]):
        if not isinstance(a, dict) or not all(k in a for k in ("path", "bytes", "sha256")):
            raise ToolchainError(f"{path}: malformed manifest (artifacts[{i}] lacks path/bytes/sha256)")
    for i, a in enumerate(manifest["artifacts"]):
        where = Path(str(a["path"]))
        if not isinstance(a["path"], str) or where.is_absolute() or ".." in where.parts:
            raise ToolchainError(f"{path}: malformed manifest (artifacts[{i}].path {a['path']!r} is not a path "
                                 "inside the run folder)")
        if not _is_number(a["bytes"]) or not isinstance(a["sha256"], str):
            raise ToolchainError(f"{path}: malformed manifest (artifacts[{i}]: bytes a number, sha256 a string)")
    for i, b in enumerate(manifest["budgets"]):
        if not isinstance(b, dict) or not all(k in b for k in ("name", "value", "limit", "passed")):
            raise ToolchainError(f"{path}: malformed manifest (budgets[{i}] lacks name/value/limit/passed)")
        if not all(b[k] is None or _is_number(b[k]) for k in ("value", "limit")) or not isinstance(b["passed"], bool):
            raise ToolchainError(f"{path}: malformed manifest (budgets[{i}]: value and limit numbers, "
                                 "passed true or false)")
    return manifest


def check_run_dir(path: str | Path, raise_on_fail: bool = True) -> list[CheckRow]:
    """Verify a run folder. Returns the rows; raises CheckFailed (exit 1) when any fails.

    The raised CheckFailed carries the rows as `.rows` so a CLI can still print the table.
    A missing or malformed manifest is a ToolchainError (exit 2).
    """
    run_dir = Path(path)
    manifest = _load_manifest(run_dir)
    if not manifest["artifacts"] and not manifest["budgets"] and not manifest.get("parity"):
        raise ToolchainError(f"{run_dir / MANIFEST}: lists no artifacts, budgets or parity rows: nothing to verify")
    try:
        rows = _rows(run_dir, manifest)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a value of the wrong type
        raise ToolchainError(f"{run_dir / MANIFEST}: malformed manifest ({type(exc).__name__}: {exc})") from exc
    failed = [r.name for r in rows if not r.passed]
    if failed and raise_on_fail:
        exc = CheckFailed(f"{run_dir}: {len(failed)} check(s) failed: {', '.join(failed[:5])}"
                          + (" ..." if len(failed) > 5 else ""))
        exc.rows = rows  # type: ignore[attr-defined]
        raise exc
    return rows


def _rows(run_dir: Path, manifest: dict) -> list[CheckRow]:
    """One row per check of a loaded manifest: each artifact's bytes and sha256, each budget, and
    the parity bounds the recipe set."""
    rows: list[CheckRow] = []
    sizes: dict[str, int] = {}

    for a in manifest["artifacts"]:
        f = run_dir / a["path"]
        if not f.is_file():
            rows.append(CheckRow(f"file {a['path']} present", None, None, False, "==", "missing"))
            continue
        size = f.stat().st_size
        sizes[a["path"]] = size
        rows.append(CheckRow(f"file {a['path']} bytes", size, a["bytes"], size == a["bytes"], "=="))
        same = sha256_file(f) == a["sha256"]
        rows.append(CheckRow(f"file {a['path']} sha256", None, None, same, "==",
                             "matches the manifest" if same else "differs from the manifest"))

    for b in manifest["budgets"]:
        value = b["value"]
        # A size budget on an artifact is re-measured on the file, not trusted from the manifest.
        if b.get("artifact") in sizes and b.get("metric", "bytes") == "bytes":
            value = sizes[b["artifact"]]
        within = value is not None and b["limit"] is not None and (
            value >= b["limit"] if b.get("compare") == ">=" else value <= b["limit"])
        ok = bool(b["passed"]) and within
        rows.append(CheckRow(f"budget {b['name']}", value, b["limit"], ok, b.get("compare", "<=")))

    bounds = manifest.get("recipe", {}).get("parity", {})
    for p in manifest.get("parity", []):
        drop = p.get("accuracy_drop")
        if drop is None and p.get("accuracy") is not None and p.get("float_accuracy") is not None:
            drop = p["float_accuracy"] - p["accuracy"]
        if drop is not None:
            limit = bounds.get("max_accuracy_drop")
            rows.append(CheckRow(f"parity {p['artifact']} accuracy drop (points)", round(drop, 4), limit,
                                 limit is None or drop <= limit + 1e-9))
        agree = p.get("decision_agreement")
        if agree is not None:
            limit = bounds.get("min_decision_agreement")
            # A lower bound: passed when value >= limit.
            rows.append(CheckRow(f"parity {p['artifact']} decision agreement (%)", agree, limit,
                                 limit is None or agree >= limit - 1e-9, ">="))
        # The recipe's optional bounds, where it set them.
        tar_drop = p.get("tar_drop")
        if tar_drop is not None and bounds.get("max_tar_drop") is not None:
            limit = bounds["max_tar_drop"]
            rows.append(CheckRow(f"parity {p['artifact']} TAR@FAR=1e-3 drop (points)", round(tar_drop, 4), limit,
                                 tar_drop <= limit + 1e-9))
        for key, name in (("embedding_cosine_mean", "mean"), ("embedding_cosine_min", "min")):
            limit = bounds.get(f"min_{key}")
            if p.get(key) is not None and limit is not None:
                rows.append(CheckRow(f"parity {p['artifact']} embedding cosine {name}", p[key], limit,
                                     p[key] >= limit - 1e-12, ">="))
    return rows
