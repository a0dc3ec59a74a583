"""The service's store and signatures, without a server."""

import json

import pytest

from toolchain.errors import ToolchainError
from toolchain.serve.signing import Signer, verify
from toolchain.serve.store import Store, is_user_id, new_user_id


def test_user_written_whole_and_leftovers_removed(tmp_path):
    store = Store(tmp_path)
    uid = new_user_id()
    assert is_user_id(uid) and not is_user_id("../etc") and not is_user_id("u_" + "a" * 40)
    store.write_user(uid, {"user_id": uid, "files": [{"file": "verifier_int8.tflite"}]},
                     {"verifier_int8.tflite": b"abc"})
    assert store.file(uid, "verifier_int8.tflite").read_bytes() == b"abc"
    assert store.file(uid, "../record.json") is None and store.file("u_nope", "x") is None
    # A process killed mid-write leaves its user under tmp/: the next start removes it, and it was
    # never visible under users/.
    half = tmp_path / "tmp" / new_user_id()
    half.mkdir()
    (half / "verifier_int8.tflite").write_bytes(b"half")
    store2 = Store(tmp_path)
    assert not half.exists() and store2.count() == 1
    store2.remember_key("retry-1", uid)
    assert store2.idempotent_user("retry-1") == uid
    assert store2.delete_user(uid) and store2.record(uid) is None and store2.idempotent_user("retry-1") is None


def test_signatures_verify_and_the_key_persists(tmp_path):
    s1 = Signer(tmp_path)
    sig = s1.sign(b"model bytes")
    assert verify(s1.public_pem, b"model bytes", sig)
    assert not verify(s1.public_pem, b"model bytez", sig)
    s2 = Signer(tmp_path)  # a restart: the same key
    assert s2.public_pem == s1.public_pem and verify(s2.public_pem, b"model bytes", s2.sign(b"model bytes"))
    assert (tmp_path / "ed25519_private.pem").stat().st_mode & 0o077 == 0
    assert json.dumps(sig)  # base64 text


def test_a_corrupt_private_key_is_a_clear_error(tmp_path):
    """It was an internal error (cryptography's ValueError) when the service started."""
    Signer(tmp_path)
    (tmp_path / "ed25519_private.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(ToolchainError, match="not a readable private key"):
        Signer(tmp_path)
