"""The enrollment service (FastAPI): one photo in, that user's signed int8 verifier files out.

Built on the fleet path: the templates are loaded once per process (toolchain.fleet.run.Engine),
and each request embeds one image, generates its head and writes its files into the templates,
exactly as `toolchain fleet` would. See toolchain.serve.store for the store's layout and its
atomic writes, toolchain.serve.signing for the signatures.

Configuration comes from `Settings` (the CLI builds it; worker processes read it from the
environment variable TOOLCHAIN_SERVE_SETTINGS, JSON).
"""

from __future__ import annotations

import hmac
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Module level: FastAPI resolves the endpoints' (string) annotations in this module's namespace.
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, UploadFile  # noqa: E402
from fastapi.responses import FileResponse, PlainTextResponse  # noqa: E402
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer  # noqa: E402

SETTINGS_ENV = "TOOLCHAIN_SERVE_SETTINGS"
IMAGE_SIZE = (112, 112)


@dataclass
class Settings:
    hypernet: str
    store: str
    calibration: str  # a .npy of shared calibration images (the CLI makes one when none is given)
    calibration_size: int = 512
    token: str | None = None  # None only with --insecure-no-auth
    max_body_bytes: int = 2 * 1024 * 1024
    keep_images: bool = False
    formats: list[str] = field(default_factory=lambda: ["executorch", "tflite"])
    precisions: list[str] = field(default_factory=lambda: ["int8", "fp32"])

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether or not it declares
    its length."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _plain(send, 413, f"request body over {self.limit} bytes")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _plain(send, 413, f"request body over {self.limit} bytes")


class _TooLarge(Exception):
    pass


async def _plain(send, status: int, text: str) -> None:
    body = json.dumps({"detail": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def decode_image(data: bytes) -> tuple[object, str | None]:
    """(uint8 HxWx3 array, None) or (None, "415 reason" / "422 reason")."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return None, f"415 image: not a decodable JPEG or PNG ({type(exc).__name__})"
    if fmt not in ("JPEG", "PNG"):
        return None, f"415 image: {fmt} is not JPEG or PNG"
    if im.size != IMAGE_SIZE or im.mode != "RGB":
        return None, (f"422 image: {im.size[0]}x{im.size[1]} {im.mode}; expected an aligned "
                      f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} RGB crop")
    return np.asarray(im, dtype=np.uint8), None


def create_app(settings: Settings | None = None):
    from toolchain.fleet.run import load_engine
    from toolchain.serve.signing import Signer
    from toolchain.serve.store import Store, new_user_id

    settings = settings or Settings.from_env()
    store = Store(settings.store)
    signer = Signer(store.root / "keys")
    engine = load_engine(settings.hypernet, settings.calibration, settings.calibration_size, 0, settings.formats,
                         settings.precisions, store.templates)
    engine.bundle.embedder  # built now, not on the first request
    # Every torch call of this process runs on one thread, with one intra-op thread: OpenMP keeps
    # a team of threads per calling thread, and a second team spinning against the one the
    # start-up left behind made an embedding 2.5x slower (measured: 59 ms against 24 ms on the
    # main thread, 27 ms with one intra-op thread). Throughput comes from --workers processes.
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enroll", initializer=_one_torch_thread)
    key_locks: dict[str, threading.Lock] = {}
    key_locks_guard = threading.Lock()
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="toolchain enrollment service",
                  description="One aligned face photo in; that user's int8 verifier files, signed with Ed25519, out.")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "hypernet_sha256": engine.bundle.sha256,
                "templates": {f"{f}/{p}": t.template_id for (f, p), t in engine.templates.items()}}

    @app.get("/v1/public-key", response_class=PlainTextResponse)
    def public_key():
        return signer.public_pem.decode()

    @app.post("/v1/users", dependencies=[Depends(authorised)])
    def enroll(image: UploadFile = File(..., description="an aligned 112x112 RGB face, JPEG or PNG"),
               formats: str = Form("executorch,tflite"), precisions: str = Form("int8"),
               idempotency_key: str | None = Header(None, max_length=200)):
        wanted = _pick(engine.templates, formats, precisions)
        if isinstance(wanted, str):
            raise HTTPException(422, wanted)
        data = image.file.read()
        pixels, problem = decode_image(data)
        if problem:
            raise HTTPException(int(problem[:3]), problem[4:])
        lock = None
        if idempotency_key:
            with key_locks_guard:
                lock = key_locks.setdefault(idempotency_key, threading.Lock())
            lock.acquire()
        try:
            if idempotency_key:
                done = store.idempotent_user(idempotency_key)
                if done:
                    return _response(store.record(done))
            user_id = new_user_id()
            record = compute.submit(_enroll_one, engine, wanted, signer, store, user_id, pixels,
                                    data if settings.keep_images else None).result()
            if idempotency_key:
                store.remember_key(idempotency_key, user_id)
            return _response(record)
        finally:
            if lock is not None:
                lock.release()

    @app.get("/v1/users/{user_id}/{file}", dependencies=[Depends(authorised)])
    def download(user_id: str, file: str):
        path = store.file(user_id, file)
        if path is None:
            raise HTTPException(404, "no such user or file")
        return FileResponse(path, media_type="application/octet-stream", filename=file)

    @app.delete("/v1/users/{user_id}", status_code=204, dependencies=[Depends(authorised)])
    def delete(user_id: str):
        if not store.delete_user(user_id):
            raise HTTPException(404, "no such user")

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    return app


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _pick(templates: dict, formats: str, precisions: str) -> dict | str:
    fs = [f.strip() for f in formats.split(",") if f.strip()]
    ps = [p.strip() for p in precisions.split(",") if p.strip()]
    missing = [f"{f}/{p}" for f in fs for p in ps if (f, p) not in templates]
    if not fs or not ps or missing:
        return f"formats/precisions: {', '.join(missing) or 'none given'} not served (served: " + \
            ", ".join(f"{f}/{p}" for f, p in templates) + ")"
    return {(f, p): templates[(f, p)] for f in fs for p in ps}


def _enroll_one(engine, templates: dict, signer, store, user_id: str, pixels, image_bytes) -> dict:
    import tempfile

    from toolchain.fleet.run import _full_export, render_user
    from toolchain.train.enroll import user_theta

    state = {k: v.detach().cpu().numpy() for k, v in user_theta(engine.bundle, pixels[None]).items()}
    rendered = render_user(user_id, state, templates, engine.features, engine.bundle.threshold)
    mode = "patched"
    if isinstance(rendered, str):  # rare: values that change the file's layout; a full export
        mode = "full"
        with tempfile.TemporaryDirectory(prefix="toolchain-serve-full-") as tmp:
            fmts = sorted({f for f, _ in templates})
            precs = sorted({p for _, p in templates})
            entry = _full_export(engine.bundle, user_id, state, engine.calib, fmts, precs, Path(tmp), rendered)
            blobs = {Path(f["path"]).name: (Path(tmp) / f["path"]).read_bytes() for f in entry["files"]}
            files = [{**f, "template": None} for f in entry["files"]]
    else:
        files, blobs = rendered
    out_files = []
    for f in files:
        name = Path(f["path"]).name
        out_files.append({"file": name, "format": f["format"], "precision": f["precision"], "bytes": f["bytes"],
                          "sha256": f["sha256"], "signature": signer.sign(blobs[name]), "template": f["template"]})
    record = {"user_id": user_id, "threshold": float(engine.bundle.threshold), "mode": mode,
              "hypernet_sha256": engine.bundle.sha256, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "files": out_files}
    store.write_user(user_id, record, blobs, image_bytes)
    return record


def _response(record: dict) -> dict:
    return {"user_id": record["user_id"], "threshold": record["threshold"],
            "files": [{"format": f["format"], "precision": f["precision"], "bytes": f["bytes"], "sha256": f["sha256"],
                       "url": f"/v1/users/{record['user_id']}/{f['file']}", "signature": f["signature"]}
                      for f in record["files"]]}


def app_from_env():
    """uvicorn's factory for worker processes (settings from TOOLCHAIN_SERVE_SETTINGS)."""
    return create_app(Settings.from_env())
