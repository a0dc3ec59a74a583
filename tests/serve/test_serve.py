"""`toolchain serve` as a real server process on 127.0.0.1, driven by httpx."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow
TOKEN = "test-token-0123456789"


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _face(seed: int) -> np.ndarray:
    from toolchain.data.synthetic import SyntheticFaces

    return SyntheticFaces(seed=5).render(seed, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, hypernet, store: Path, token_file: Path, extra=()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TOOLCHAIN_TOKEN": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "toolchain", "serve", "--hypernet", str(hypernet),
                                      "--store", str(store), "--port", str(self.port), "--token-file",
                                      str(token_file), "--max-body", str(1024 * 1024), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read().decode()[-2000:])
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(1)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server(registry_hypernet_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "token").write_text(TOKEN)
    srv = Server(registry_hypernet_ckpt, root / "store", root / "token")
    srv.root = root
    yield srv
    srv.stop()


def _client(server, token=TOKEN):
    return httpx.Client(base_url=server.url, timeout=120,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


def _enroll(client, image: bytes, **data):
    return client.post("/v1/users", files={"image": ("face.png", image, "image/png")}, data=data)


def test_enroll_download_verify_run(server, registry_hypernet_ckpt, tmp_path):
    from toolchain.fleet import run_fleet
    from toolchain.runtime import load_runner
    from toolchain.serve.signing import verify

    face = _face(1)
    with _client(server) as c:
        r = _enroll(c, _png(face))
        assert r.status_code == 200, r.text
        body = r.json()
        uid = body["user_id"]
        assert {(f["format"], f["precision"]) for f in body["files"]} == {("executorch", "int8"), ("tflite", "int8")}
        pem = httpx.get(server.url + "/v1/public-key").content
        files = {}
        for f in body["files"]:
            data = c.get(f["url"]).content
            assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
            assert verify(pem, data, f["signature"]) and not verify(pem, data + b"x", f["signature"])
            files[f["url"].rsplit("/", 1)[1]] = data
    # Byte-identical to `toolchain fleet` for the same image, calibration set and user id.
    users = tmp_path / "users" / uid
    users.mkdir(parents=True)
    (users / "0.png").write_bytes(_png(face))
    out = tmp_path / "fleet"
    shutil.copytree(server.root / "store" / ".templates", out / ".templates")
    run_fleet(registry_hypernet_ckpt, users.parent, out, calibration=server.root / "store" / "calibration.npy",
              calibration_size=512, precisions=["int8"])
    for name, data in files.items():
        assert (out / uid / name).read_bytes() == data, name
        (tmp_path / name).write_bytes(data)
        scores = load_runner(tmp_path / name).run(np.stack([face, face[:, ::-1], _face(2)]))
        assert scores.shape[0] == 3 and np.isfinite(scores).all()


def test_auth_limits_and_bad_images(server):
    face = _png(_face(3))
    assert _enroll(_client(server, token=None), face).status_code == 401
    assert _enroll(_client(server, token="wrong"), face).status_code == 401
    with _client(server) as c:
        big = _enroll(c, b"\x89PNG" + os.urandom(2 * 1024 * 1024))
        assert big.status_code == 413
        assert _enroll(c, b"definitely not an image").status_code == 415
        small = np.zeros((64, 64, 3), np.uint8)
        r = _enroll(c, _png(small))
        assert r.status_code == 422 and "112x112" in r.json()["detail"]
        assert _enroll(c, face, formats="onnx").status_code == 422
        assert c.get("/v1/users/u_" + "x" * 22 + "/verifier_int8.tflite").status_code == 404
    assert httpx.get(server.url + "/healthz").json()["hypernet_sha256"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_delete_idempotency_and_concurrency(server):
    face = _png(_face(4))
    with _client(server) as c:
        a = _enroll(c, face, **{}).json()
        r1 = c.post("/v1/users", files={"image": ("f.png", face, "image/png")}, headers={"Idempotency-Key": "k1"})
        r2 = c.post("/v1/users", files={"image": ("f.png", face, "image/png")}, headers={"Idempotency-Key": "k1"})
        assert r1.json()["user_id"] == r2.json()["user_id"] != a["user_id"]
        assert httpx.get(server.url + a["files"][0]["url"]).status_code == 401  # no token: nothing
        assert c.delete(f"/v1/users/{a['user_id']}").status_code == 204
        assert c.get(a["files"][0]["url"]).status_code == 404
        assert c.delete(f"/v1/users/{a['user_id']}").status_code == 404

    results = []

    def client_thread(k):
        with _client(server) as c:
            for j in range(3):
                r = _enroll(c, _png(_face(100 + 10 * k + j)))
                results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and all(code == 200 for code, _ in results)
    with _client(server) as c:
        for _, body in results:
            for f in body["files"]:
                assert hashlib.sha256(c.get(f["url"]).content).hexdigest() == f["sha256"]


def test_restart_serves_enrolled_users(server, registry_hypernet_ckpt, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "store").mkdir()
    for name in (".templates", "calibration.npy"):  # the first start reuses them: no rebuild
        src = server.root / "store" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / "store" / name)
    first = Server(registry_hypernet_ckpt, tmp_path / "store", tmp_path / "token")
    try:
        with _client(first) as c:
            body = _enroll(c, _png(_face(7))).json()
    finally:
        first.stop()
    second = Server(registry_hypernet_ckpt, tmp_path / "store", tmp_path / "token")
    try:
        with _client(second) as c:
            for f in body["files"]:
                assert hashlib.sha256(c.get(f["url"]).content).hexdigest() == f["sha256"]
    finally:
        second.stop()


def test_refuses_to_start_without_a_token(registry_hypernet_ckpt, tmp_path):
    env = {**os.environ, "TOOLCHAIN_TOKEN": ""}
    res = subprocess.run([sys.executable, "-m", "toolchain", "serve", "--hypernet", str(registry_hypernet_ckpt), "--store",
                          str(tmp_path / "s")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "no bearer token" in res.stderr


def test_a_port_in_use_is_a_clear_error_before_any_work(registry_hypernet_ckpt, tmp_path, capsys):
    """uvicorn exited 3 after the templates were built, its reason only in the store's log."""
    import socket

    from toolchain.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc = main(["serve", "--hypernet", str(registry_hypernet_ckpt), "--store", str(tmp_path / "s"),
                   "--insecure-no-auth", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "s").exists()  # nothing built or written
    rc = main(["serve", "--hypernet", str(registry_hypernet_ckpt), "--store", str(tmp_path / "s"),
               "--insecure-no-auth", "--host", "no-such-host.invalid"])
    assert rc == 2 and "--host no-such-host.invalid" in capsys.readouterr().err


def test_a_bad_token_file_or_hypernet_fails_before_the_store_is_made(tmp_path, capsys):
    """A token file of random bytes was an internal error; a bad hypernet left a store behind."""
    import socket

    from toolchain.cli import main

    (tmp_path / "token").write_bytes(bytes(range(128, 256)))
    (tmp_path / "hypernet.pt").write_bytes(bytes(range(256)) * 16)
    store = tmp_path / "s"
    rc = main(["serve", "--hypernet", str(tmp_path / "hypernet.pt"), "--store", str(store), "--token-file",
               str(tmp_path / "token")])
    assert rc == 2 and "not a text file" in capsys.readouterr().err
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rc = main(["serve", "--hypernet", str(tmp_path / "hypernet.pt"), "--store", str(store), "--insecure-no-auth",
               "--port", str(port)])
    assert rc == 2 and "not a loadable weights file" in capsys.readouterr().err
    assert not store.exists()
