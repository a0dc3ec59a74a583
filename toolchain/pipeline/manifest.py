"""The run manifest: one JSON file that says what a run produced and whether its checks held.

Keys (DIR/manifest.json):
- `artifacts`: [{path (relative to DIR), format, precision, bytes, sha256, ...}]
- `budgets`: [{name, value, limit, passed}]
- `parity`: [{artifact, accuracy, float_accuracy, decision_agreement, latency_ms, passed, ...}]
- `evaluation`: the per-user route's and the backbone baseline's accuracy on the same pairs
- `profile`, `users`, `comparison`: what the report tables show
- `environment` (CPU with its int8 features, CUDA, Python), `latency_cpu` (the CPU that measured
  the parity latencies), `versions`, `timings` (seconds per stage, from when it last ran), `stages` (ran/skipped now)
- `recipe` (resolved), `recipe_hash`, `passed`, `failures`
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from toolchain.atomic import write_json_atomic
from toolchain.environment import environment_facts
from toolchain.pipeline.core import RunContext, StageReport

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1

# distribution name -> key in the manifest
_TOOLS = {
    "torch": "torch",
    "executorch": "executorch",
    "tensorflow-cpu": "tensorflow",
    "ai-edge-litert": "ai-edge-litert",
    "onnx2tf": "onnx2tf",
    "toolchain": "toolchain",
}


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist, key in _TOOLS.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions.setdefault(key, None)
    if versions.get("tensorflow") is None:  # the full tensorflow wheel instead of -cpu
        try:
            versions["tensorflow"] = importlib.metadata.version("tensorflow")
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def failures(core: dict) -> list[str]:
    """One line per failed budget or parity bound."""
    out = [f"budget {b['name']}: {b['value']} > {b['limit']}" for b in core.get("budgets", [])
           if not b.get("passed")]
    for p in core.get("parity", []):
        if not p.get("passed", True):
            out.append(f"parity {p['artifact']}: {p.get('reason', 'bound not met')}")
    for p in core.get("parity_arm64", []):
        if p.get("passed") is False:
            out.append(f"ARM parity {p['artifact']}: {p.get('reason')}")
    return out


def _int8(results: dict, model: str | None = None) -> tuple[int | None, dict[str, float]]:
    """(smallest int8 file size, {format: int8 latency ms}) of the exported artifacts."""
    arts = [a for a in results.get("export", {}).get("artifacts", [])
            if a["precision"] == "int8" and (model is None or a.get("model") == model)]
    lat = {p["artifact"]: p.get("latency_ms") for p in results.get("parity", {}).get("rows", [])}
    latency: dict[str, float] = {}
    for a in arts:
        if lat.get(a["path"]) is not None:
            latency[a["format"]] = min(latency.get(a["format"], float("inf")), float(lat[a["path"]]))
    return (min(a["bytes"] for a in arts) if arts else None), latency


def comparison(recipe, results: dict) -> list[dict]:
    """The per-user route (or the exported model) against the zoo backbones.

    Counts come from profiling each float graph. Size, latency and accuracy appear only where
    this run exported / evaluated that model; otherwise they are None ("not exported").
    """
    prof = results.get("profile", {})
    if not prof:
        return []
    ev = results.get("evaluate", {})
    main = prof.get("profile", {})
    size, latency = _int8(results)
    rows = []
    if recipe.kind == "verifier":
        rows.append({"model": "verifier f (per-user route)", "params": main.get("params"), "macs": main.get("macs"),
                     "int8_bytes": size, "latency_ms": latency or None,
                     "accuracy": (ev.get("per_user") or {}).get("accuracy")})
    else:
        rows.append({"model": f"{main.get('model')} (this run)", "params": main.get("params"),
                     "macs": main.get("macs"), "int8_bytes": size, "latency_ms": latency or None,
                     "accuracy": (ev.get("backbone") or {}).get("accuracy")})
    for name, z in prof.get("zoo", {}).items():
        if recipe.kind == "embedding" and name == main.get("model"):
            continue  # the row above is this model, as this run trained and exported it
        trained = name.endswith("(h_bb as trained)")
        rows.append({"model": name, "params": z.get("params"), "macs": z.get("macs"),
                     "int8_bytes": None, "latency_ms": None,
                     "accuracy": (ev.get("backbone") or {}).get("accuracy") if trained else None})
    return rows


def manifest_core(ctx: RunContext) -> dict[str, Any]:
    """Everything in the manifest that depends only on the recipe and the stage results.

    It is stable across cached runs (timings are those of the runs that did the work), so the
    report stage can use it as its cache key.
    """
    r = ctx.results
    recipe = ctx.recipe
    core = {
        "schema": SCHEMA_VERSION,
        "name": recipe.name,
        "kind": recipe.kind,
        "recipe": recipe.resolved(),
        "recipe_hash": recipe.hash(),
        "data": r.get("data", {}),
        "training": {k: r[k] for k in ("train_backbone", "train_hypernet") if k in r},
        "users": r.get("enroll", {}).get("users", []),
        "evaluation": r.get("evaluate", {}),
        "artifacts": r.get("export", {}).get("artifacts", []),
        "int8_recovery": r.get("export", {}).get("int8_recovery"),  # QAT, sensitivity, fallback
        "profile": r.get("profile", {}).get("profile", {}),
        "budgets": r.get("profile", {}).get("budgets", []),
        "comparison": comparison(recipe, r),
        "parity": r.get("parity", {}).get("rows", []),
        "parity_arm64": r.get("parity", {}).get("arm64", []),
        "versions": tool_versions(),
        "environment": environment_facts(),
        "latency_cpu": r.get("parity", {}).get("cpu"),  # where the parity latencies were measured
        "timings": {k: round(v, 3) for k, v in ctx.timings.items()},  # wall seconds per stage
        "cpu_timings": {k: round(v, 3) for k, v in ctx.cpu_timings.items()},
    }
    core["failures"] = failures(core)
    core["passed"] = not core["failures"]
    return core


def write_manifest(out_dir: Path, core: dict, reports: list[StageReport], extra: dict | None = None) -> Path:
    manifest = dict(core)
    manifest["stages"] = [{"name": s.name, "status": s.status, "seconds": s.seconds} for s in reports]
    manifest.update(extra or {})
    path = Path(out_dir) / MANIFEST
    write_json_atomic(path, manifest)
    return path
