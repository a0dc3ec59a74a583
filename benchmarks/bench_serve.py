"""Load benchmark of the enrollment service (`toolchain serve`), on 127.0.0.1 only.

    python benchmarks/bench_serve.py --hypernet artifacts/demo/train/hypernet/hypernet.pt \
        [--clients 1] [--requests 25] [--workers 1] [--store DIR]

Starts the server (its own store and token), then for int8 `.tflite` and for int8 `.pte` runs C
concurrent clients with R enrollments each (one synthetic 112x112 face per request; the
embedding is part of every request). Prints requests/s and p50/p99 latency per request, then
checks that every accepted request's files are present and their signatures verify.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _png(img) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    import httpx
    from rich.console import Console
    from rich.table import Table

    from toolchain.data.synthetic import SyntheticFaces
    from toolchain.environment import describe_cpu
    from toolchain.serve.signing import verify

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hypernet", default="artifacts/demo/train/hypernet/hypernet.pt")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=25, help="per client and format")
    ap.add_argument("--workers", type=int, default=1,
                    help="server processes (each embeds on one intra-op thread; on 2 cores one measured fastest)")
    ap.add_argument("--store", default=None, help="store folder (default: a temporary one; templates built there)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if not Path(args.hypernet).is_file():
        print(f"error: {args.hypernet}: no hypernet checkpoint (run `make demo` first)", file=sys.stderr)
        return 2
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 1000):
        print("error: --clients must be 1..64 and --requests 1..1000", file=sys.stderr)
        return 2

    n = args.clients * args.requests
    gen = SyntheticFaces(seed=31)
    faces = [_png(img) for img in gen.render_batch(list(range(2 * n)), [0] * (2 * n))]
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        store = Path(args.store or Path(tmp) / "store")
        (Path(tmp) / "token").write_text(token)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "toolchain", "serve", "--hypernet", args.hypernet, "--store",
                                 str(store), "--port", str(port), "--workers", str(args.workers), "--token-file",
                                 str(Path(tmp) / "token")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOOLCHAIN_TOKEN": ""})
        try:
            t0 = time.time()
            while True:
                if proc.poll() is not None:
                    print("error: the server exited at start", file=sys.stderr)
                    return 1
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
                if time.time() - t0 > 900:
                    print("error: the server did not start in 15 minutes", file=sys.stderr)
                    return 1
            # Workers load the templates on start; one request each warms them up.
            headers = {"Authorization": f"Bearer {token}"}
            for _ in range(2 * args.workers):
                httpx.post(url + "/v1/users", files={"image": ("f.png", faces[0], "image/png")}, headers=headers,
                           timeout=120)
            rows, accepted = [], []
            for k, fmt in enumerate(("tflite", "executorch")):
                lat, lock = [], threading.Lock()

                def client(c, fmt=fmt, k=k, lat=lat, lock=lock):
                    with httpx.Client(base_url=url, headers=headers, timeout=120) as cl:
                        for j in range(args.requests):
                            img = faces[k * n + c * args.requests + j]
                            s0 = time.perf_counter()
                            r = cl.post("/v1/users", files={"image": ("f.png", img, "image/png")},
                                        data={"formats": fmt, "precisions": "int8"})
                            dt = time.perf_counter() - s0
                            with lock:
                                lat.append(dt)
                                if r.status_code == 200:
                                    accepted.append(r.json())

                threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
                w0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - w0
                ms = np.array(lat) * 1000
                rows.append((f"int8 .{'pte' if fmt == 'executorch' else 'tflite'}", len(lat), len(lat) / wall,
                             np.percentile(ms, 50), np.percentile(ms, 99)))
            # Nothing lost under load: every accepted user's files are there and verify.
            pem = httpx.get(url + "/v1/public-key").content
            bad = 0
            with httpx.Client(base_url=url, headers=headers, timeout=60) as cl:
                for body in accepted:
                    for f in body["files"]:
                        data = cl.get(f["url"]).content
                        if hashlib.sha256(data).hexdigest() != f["sha256"] or not verify(pem, data, f["signature"]):
                            bad += 1
        finally:
            proc.terminate()
            proc.wait(30)
    table = Table(title=f"enrollment service: {args.clients} concurrent clients x {args.requests} requests, "
                        f"{args.workers} server workers, 127.0.0.1",
                  caption=f"CPU: {describe_cpu()}; every request embeds one image")
    for col in ("files", "requests", "requests/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "files" else "right")
    for name, count, rps, p50, p99 in rows:
        table.add_row(name, str(count), f"{rps:.1f}", f"{p50:.1f}", f"{p99:.1f}")
    Console().print(table)
    total = sum(r[1] for r in rows)
    print(f"accepted {len(accepted)}/{total}; files missing or failing their signature: {bad}")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({
            "clients": args.clients, "requests": args.requests, "workers": args.workers, "cpu": describe_cpu(),
            "accepted": len(accepted), "total": total, "bad_files": bad,
            "rows": [{"files": f, "requests": c, "rps": rps, "p50_ms": p50, "p99_ms": p99}
                     for f, c, rps, p50, p99 in rows]}, indent=2))
    return 0 if bad == 0 and len(accepted) == total else 1


if __name__ == "__main__":
    sys.exit(main())
