"""`toolchain serve`: the enrollment service (toolchain.serve.app) under uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

import click

from toolchain.errors import ToolchainError


@click.command("serve")
@click.option("--hypernet", required=True, type=click.Path(dir_okay=False, exists=True), help="Hypernet checkpoint.")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Where users, keys and templates live (created on first start).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Server processes.")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True),
              help="File holding the bearer token (else the TOOLCHAIN_TOKEN environment variable).")
@click.option("--insecure-no-auth", is_flag=True, help="Serve without a token (local experiments only).")
@click.option("--calibration", type=click.Path(exists=True),
              help="Calibration images shared by every user (default: 512 synthetic faces, made once in the store).")
@click.option("--max-body", "max_body", type=click.IntRange(min=1024), default=2 * 1024 * 1024, show_default=True,
              help="Largest request body in bytes (413 above).")
@click.option("--keep-images", is_flag=True, help="Also store each enrollment photo (off: it is never written).")
@click.pass_context
def serve(ctx, hypernet, store_dir, host, port, workers, token_file, insecure_no_auth, calibration, max_body,
          keep_images) -> None:
    """Serve enrollment over HTTP: POST /v1/users (multipart `image`) returns the user's int8
    verifier files, signed with Ed25519; GET /v1/users/{id}/{file}; DELETE /v1/users/{id};
    GET /v1/public-key; GET /healthz; OpenAPI docs at /docs. Every route but the last two needs
    `Authorization: Bearer TOKEN`."""
    import uvicorn

    from toolchain.fleet.run import load_engine
    from toolchain.serve.app import SETTINGS_ENV, Settings
    from toolchain.serve.store import Store

    token = _read_token(token_file) if token_file else os.environ.get("TOOLCHAIN_TOKEN", "").strip()
    if not token and not insecure_no_auth:
        raise ToolchainError("no bearer token: set TOOLCHAIN_TOKEN or pass --token-file (or --insecure-no-auth "
                             "for a local experiment)")
    from toolchain.serve.signing import Signer

    _check_listenable(host, port)  # before minutes of template building, not after
    from toolchain.models.hypernet import load_hypernet

    bundle = load_hypernet(hypernet)  # a file that is not a hypernet fails before the store is made
    store = Store(store_dir)
    Signer(store.root / "keys")  # the key pair exists before any worker starts
    calib = calibration or str(_default_calibration(store.root))
    settings = Settings(hypernet=str(Path(hypernet).resolve()), store=str(store.root.resolve()),
                        calibration=str(Path(calib).resolve()), token=token or None, max_body_bytes=max_body,
                        keep_images=keep_images)
    from toolchain.cli.common import run_logged

    log = store.root / "serve.log"
    with run_logged(ctx, log):  # the libraries' output, the workers' included, goes to the store's log
        # Templates are built (or found) once here, so the workers only read them.
        engine = load_engine(bundle, settings.calibration, settings.calibration_size, 0,
                             settings.formats, settings.precisions, store.templates, say=click.echo)
        click.echo(f"templates ready ({len(engine.templates)}); serving on http://{host}:{port} "
                   f"(docs: /docs; log: {log})")
        os.environ[SETTINGS_ENV] = settings.to_env()
        try:
            uvicorn.run("toolchain.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                        log_level="warning")
        except SystemExit as exc:  # uvicorn exits 3 when it cannot start (the port taken since the check)
            if exc.code not in (None, 0):
                raise ToolchainError(f"the server could not start on {host}:{port} (see {log})") from exc


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ToolchainError(f"--token-file {path}: not a text file (not UTF-8)") from exc
    if not token:
        raise ToolchainError(f"--token-file {path}: empty")
    return token


def _check_listenable(host: str, port: int) -> None:
    """A one-line error now if `host` does not resolve or `port` cannot be bound there."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ToolchainError(f"--host {host}: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ToolchainError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _default_calibration(root: Path) -> Path:
    """512 synthetic faces (not any user's), made once and kept, so restarts reuse the templates."""
    import numpy as np

    from toolchain.atomic import atomic_write_bytes
    from toolchain.data.codec import decode_image
    from toolchain.data.synthetic import SyntheticFaces

    path = root / "calibration.npy"
    if not path.is_file():
        gen = SyntheticFaces(seed=2026)
        ids = list(range(1_000_000, 1_000_512))
        images = np.stack([decode_image(j) for j in gen.render_jpeg_batch(ids, [0] * len(ids))])
        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, images)

        atomic_write_bytes(path, write)
    return path
