"""`toolchain fleet merge`: join the manifests of shards run on several machines, and check them.

Every shard must come from the same hypernet, calibration set and templates; together they
cover shards 0..N-1 once; no user appears twice; every file is present with its recorded size
and sha256. The merged manifest lists each file by its path relative to the merged manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from toolchain.atomic import write_json_atomic
from toolchain.errors import CheckFailed, ToolchainError
from toolchain.fleet.run import MANIFEST, MANIFEST_SCHEMA, SAFE_ID


def _check_entries(path: Path, entries: list) -> None:
    """Each user id is one `toolchain fleet` accepts, and each file a relative path with its size
    and digest: a manifest is input, and its paths are read."""
    for e in entries:
        if not SAFE_ID.fullmatch(e["user"]) or e["user"] in (".", ".."):
            raise ToolchainError(f"{path}: malformed fleet manifest (user id {e['user']!r} is not a safe file name)")
        for f in e["files"]:
            rel = f.get("path") if isinstance(f, dict) else None
            # Relative, not necessarily inside: a merged manifest lists its shards' files as ../shard/...
            if not isinstance(rel, str) or Path(rel).is_absolute() \
                    or not isinstance(f.get("bytes"), int) or not isinstance(f.get("sha256"), str):
                raise ToolchainError(f"{path}: malformed fleet manifest (user {e['user']}: each file needs a "
                                     "relative path, bytes and sha256)")


def merge_manifests(shards, out: str | Path) -> dict:
    """shards: fleet output folders (their fleet_manifest.json) or manifest files."""
    out = Path(out)
    heads, users, problems = [], {}, []
    for shard in map(Path, shards):
        path = shard if shard.is_file() else shard / MANIFEST
        d = path.parent
        if not path.is_file():
            raise ToolchainError(f"{shard}: no {MANIFEST} (not a fleet output folder)")
        try:
            m = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ToolchainError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(m, dict) or not isinstance(m.get("users", []), list) \
                or not all(isinstance(e, dict) and isinstance(e.get("user"), str) and isinstance(e.get("files"), list)
                           for e in m.get("users", [])):
            raise ToolchainError(f"{path}: malformed fleet manifest (an object whose `users` lists "
                                 "{user, files, ...} entries)")
        _check_entries(path, m.get("users", []))
        if m.get("schema") != MANIFEST_SCHEMA:
            raise ToolchainError(f"{path}: unknown schema {m.get('schema')!r}")
        heads.append((d, m))
        for e in m.get("users", []):
            if e["user"] in users:
                problems.append(f"user {e['user']} is in {users[e['user']][0]} and {d}")
                continue
            for f in e["files"]:
                p = d / f["path"]
                if not p.is_file():
                    problems.append(f"{p}: missing")
                elif p.stat().st_size != f["bytes"] or hashlib.sha256(p.read_bytes()).hexdigest() != f["sha256"]:
                    problems.append(f"{p}: size or sha256 differs from the manifest")
            users[e["user"]] = (d, e)
    if not heads:
        raise ToolchainError("no shard folders given")
    keys = ("hypernet_sha256", "calibration", "templates")
    first = heads[0][1]
    for d, m in heads[1:]:
        for k in keys:
            if m.get(k) != first.get(k):
                problems.append(f"{d}: {k} differs from {heads[0][0]}'s")
    shards = [m.get("shard") for _, m in heads]
    if any(s is not None for s in shards):
        n = {int(s.split("/")[1]) for s in shards if s}
        got = sorted(int(s.split("/")[0]) for s in shards if s)
        if len(n) != 1 or None in shards or got != list(range(next(iter(n)))):
            problems.append(f"shards {shards} do not cover 0..N-1 exactly once")
    if problems:
        raise CheckFailed(f"fleet merge: {len(problems)} problem(s): " + "; ".join(problems[:5]))
    out.mkdir(parents=True, exist_ok=True)
    merged_users = []
    for user, (d, e) in sorted(users.items()):
        files = [{**f, "path": os.path.relpath(d / f["path"], out)} for f in e["files"]]
        merged_users.append({**e, "files": files})
    merged = {k: first.get(k) for k in ("schema", *keys, "tool_versions")}
    merged.update(shard=None, merged_from=[str(shard) for shard in shards], users=merged_users)
    write_json_atomic(out / MANIFEST, merged)
    return merged
