"""The enrollment service's store: users' files, their records, the signing key, idempotency keys.

Layout (DIR):
- `users/<user_id>/`: `record.json` and the user's files (`verifier_int8.tflite`, ...);
- `idempotency/<sha256 of the key>`: the user id a retried request gets back;
- `keys/ed25519_private.pem` (mode 0600) and `keys/ed25519_public.pem`;
- `.templates/`: the fleet templates (toolchain.fleet.templates);
- `tmp/`: users being written.
A user is written into `tmp/` and renamed into `users/` whole, so a server killed mid-request
leaves no half-written user; `tmp/` is emptied at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from toolchain.atomic import atomic_write_bytes, write_json_atomic

RECORD = "record.json"


def new_user_id() -> str:
    """Random and URL-safe: nothing from a request ever becomes a path."""
    return "u_" + secrets.token_urlsafe(16)


def is_user_id(text: str) -> bool:
    return text.startswith("u_") and len(text) == 24 and all(c.isalnum() or c in "-_" for c in text)


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("users", "idempotency", "keys", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").iterdir():  # a previous process died mid-write
            shutil.rmtree(leftover, ignore_errors=True)

    @property
    def templates(self) -> Path:
        return self.root / ".templates"

    def user_dir(self, user_id: str) -> Path | None:
        if not is_user_id(user_id):
            return None
        d = self.root / "users" / user_id
        return d if (d / RECORD).is_file() else None

    def record(self, user_id: str) -> dict | None:
        d = self.user_dir(user_id)
        return json.loads((d / RECORD).read_text()) if d else None

    def file(self, user_id: str, name: str) -> Path | None:
        rec = self.record(user_id)
        if rec is None or name not in {f["file"] for f in rec["files"]}:
            return None
        return self.root / "users" / user_id / name

    def write_user(self, user_id: str, record: dict, blobs: dict[str, bytes], image: bytes | None = None) -> None:
        """All of a user's files and its record, or nothing: written under tmp/, then renamed."""
        staging = self.root / "tmp" / user_id
        staging.mkdir(parents=True)
        for name, data in blobs.items():
            (staging / name).write_bytes(data)
        if image is not None:
            (staging / "enrollment_image").write_bytes(image)
        write_json_atomic(staging / RECORD, record)
        os.replace(staging, self.root / "users" / user_id)

    def delete_user(self, user_id: str) -> bool:
        d = self.user_dir(user_id)
        if d is None:
            return False
        trash = self.root / "tmp" / f"deleted-{user_id}"
        os.replace(d, trash)  # gone from users/ at once; removed from disk after
        shutil.rmtree(trash, ignore_errors=True)
        for f in (self.root / "idempotency").iterdir():
            if f.read_text().strip() == user_id:
                f.unlink(missing_ok=True)
        return True

    def idempotent_user(self, key: str) -> str | None:
        path = self._key_path(key)
        if not path.is_file():
            return None
        user = path.read_text().strip()
        return user if self.user_dir(user) else None

    def remember_key(self, key: str, user_id: str) -> None:
        atomic_write_bytes(self._key_path(key), lambda tmp: Path(tmp).write_text(user_id))

    def _key_path(self, key: str) -> Path:
        return self.root / "idempotency" / hashlib.sha256(key.encode()).hexdigest()

    def count(self) -> int:
        return sum(1 for _ in (self.root / "users").iterdir())
