"""Ed25519 signatures of the files the service hands out (`cryptography`).

The key pair is created on first start in the store (`keys/`), the private key readable by its
owner only. `signature` = base64 of the 64-byte Ed25519 signature over the file's bytes; an app
verifies it with the public key (`GET /v1/public-key`, PEM) before loading the file.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toolchain.atomic import atomic_write_bytes
from toolchain.errors import ToolchainError


class Signer:
    def __init__(self, key_dir: str | Path) -> None:
        key_dir = Path(key_dir)
        private_path, public_path = key_dir / "ed25519_private.pem", key_dir / "ed25519_public.pem"
        if not private_path.is_file():
            _create_key(private_path)
        try:
            self._key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:  # not a PEM key, or one behind a password
            raise ToolchainError(f"{private_path}: not a readable private key ({exc}); restore it from a "
                                 "backup (apps trust its public key), or remove the store's keys/ folder "
                                 "to make a new pair") from exc
        if not isinstance(self._key, Ed25519PrivateKey):
            raise ToolchainError(f"{private_path}: not an Ed25519 private key")
        self.public_pem = self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        if not public_path.is_file() or public_path.read_bytes() != self.public_pem:
            atomic_write_bytes(public_path, lambda tmp: Path(tmp).write_bytes(self.public_pem))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._key.sign(data)).decode()


def _create_key(path: Path) -> None:
    """A new private key at `path`, unless another process made one first: written under a
    temporary name and hard-linked into place, which fails if the name exists. Every process
    then loads the one key on disk."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def verify(public_pem: bytes, data: bytes, signature_b64: str) -> bool:
    """True when `signature_b64` is the key's Ed25519 signature of `data`."""
    from cryptography.exceptions import InvalidSignature

    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(base64.b64decode(signature_b64), data)
        return True
    except (InvalidSignature, ValueError):
        return False
