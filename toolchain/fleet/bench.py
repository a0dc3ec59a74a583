"""`toolchain bench fleet --users N`: the fleet path against full exports, measured in one run.

N synthetic users (one rendered face each) go through `run_fleet` into a fresh folder, so the
templates are built in the run. The table gives the template build, the full-export time per user
(the template's probe exports, the same call `toolchain export` makes), the write time per file
(quantising, encoding and patching: no embedding), the time per user end to end with the
embedding (h_bb + h_gen, one image at a time as enrollment does) shown apart, and their ratios.
Then `check_users` random users are enrolled and exported in full, and their files compared with
the fleet's by sha256.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from toolchain.errors import CheckFailed, ToolchainError


def write_synthetic_users(folder: Path, n: int, seed: int = 1234, calibration: int = 512) -> Path:
    """n users (folder/uNNNNN/0.jpg, one synthetic identity each) and folder/calibration.npy
    (other identities' faces). Returns the users folder."""
    from toolchain.data.codec import decode_image
    from toolchain.data.synthetic import SyntheticFaces

    gen = SyntheticFaces(seed=seed)
    users = folder / "users"
    for start in range(0, n, 256):
        ids = list(range(start, min(n, start + 256)))
        for i, jpeg in zip(ids, gen.render_jpeg_batch(ids, [0] * len(ids))):
            (users / f"u{i:05d}").mkdir(parents=True, exist_ok=True)
            (users / f"u{i:05d}" / "0.jpg").write_bytes(jpeg)
    others = list(range(n, n + calibration))
    calib = np.stack([decode_image(j) for j in gen.render_jpeg_batch(others, [1] * len(others))])
    np.save(folder / "calibration.npy", calib)
    return users


def bench_fleet(hypernet: str | Path, n_users: int, out: str | Path, *, formats=("executorch", "tflite"),
                precisions=("int8",), calibration_size: int = 512, check_users: int = 20, seed: int = 0,
                progress_bar=None, say=print) -> dict:
    from toolchain.export import export_model
    from toolchain.fleet.run import run_fleet
    from toolchain.train.enroll import enroll_images, read_image

    out = Path(out)
    if (out / "fleet").exists():
        raise ToolchainError(f"{out / 'fleet'} exists: the benchmark builds its templates and writes every user "
                             "from scratch; choose another --out")
    from toolchain.models.hypernet import load_hypernet

    bundle = load_hypernet(hypernet)  # a file that is not a hypernet fails before the users are rendered
    t0 = time.perf_counter()
    users = write_synthetic_users(out / "data", n_users, calibration=calibration_size)
    render_seconds = time.perf_counter() - t0
    say(f"rendered {n_users} synthetic users in {render_seconds:.1f} s")
    fleet_dir = out / "fleet"
    result = run_fleet(bundle, users, fleet_dir, calibration=out / "data" / "calibration.npy",
                       calibration_size=calibration_size, formats=formats, precisions=precisions,
                       progress=say, progress_bar=progress_bar)
    t = result.timings
    files_per_user = len(formats) * len(precisions)
    n = max(1, result.users)
    write_per_file = t["write_seconds"] / (n * files_per_user)
    full_per_user = t["full_export_seconds_per_user"]
    rows = {
        "users": result.users, "files_per_user": files_per_user,
        "template_build_s": t["build_seconds"],
        "full_export_per_user_s": full_per_user,
        "write_per_file_ms": 1000 * write_per_file,
        "full_export_per_file_ms": 1000 * full_per_user / files_per_user,
        "speedup_per_file": full_per_user / files_per_user / write_per_file,
        "embed_per_user_ms": 1000 * t["embed_seconds"] / n,
        "end_to_end_per_user_ms": 1000 * t["users_seconds"] / n,
        "all_users_without_embedding_s": t["users_seconds"] - t["embed_seconds"],
        "all_users_embedding_s": t["embed_seconds"],
        "fallbacks": len(result.fallbacks), "problems": len(result.problems),
    }
    # Byte identity on a random sample: `toolchain enroll` + `toolchain export` of the same users.
    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in users.iterdir())
    sample = [names[i] for i in sorted(rng.choice(len(names), min(check_users, len(names)), replace=False))]
    same = 0
    with tempfile.TemporaryDirectory(prefix="toolchain-bench-fleet-") as tmp:
        for k, name in enumerate(sample, 1):
            udir = enroll_images(bundle, read_image(users / name / "0.jpg")[None], Path(tmp) / "u" / name, user=name)
            recs = export_model(udir, Path(tmp) / "x" / name, formats, precisions, out / "data" / "calibration.npy",
                                calibration_size=calibration_size, progress=False)
            if all(hashlib.sha256(Path(r.path).read_bytes()).digest()
                   == hashlib.sha256((fleet_dir / name / r.file).read_bytes()).digest() for r in recs):
                same += 1
            say(f"identity check {k}/{len(sample)}: {same} identical")
    rows["identity_checked"], rows["identity_equal"] = len(sample), same
    if same != len(sample):
        raise CheckFailed(f"fleet bench: {len(sample) - same} of {len(sample)} users' fleet files differ from their "
                          "full exports")
    return rows


def render_fleet_table(rows: dict, cpu: str):
    from rich.table import Table

    t = Table(title=f"fleet benchmark: {rows['users']} users x {rows['files_per_user']} files (one run)",
              caption=f"CPU: {cpu}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for label, value in (
        ("template build (all templates)", f"{rows['template_build_s']:.1f} s"),
        ("full export, per user", f"{rows['full_export_per_user_s']:.1f} s"),
        ("full export, per file", f"{rows['full_export_per_file_ms']:.0f} ms"),
        ("fleet write, per file (quantise + encode + patch)", f"{rows['write_per_file_ms']:.3f} ms"),
        ("ratio: full export / fleet write, per file", f"{rows['speedup_per_file']:,.0f} x"),
        ("embedding + head generation, per user", f"{rows['embed_per_user_ms']:.1f} ms"),
        ("end to end, per user (embedding included)", f"{rows['end_to_end_per_user_ms']:.1f} ms"),
        (f"all {rows['users']} users without embedding", f"{rows['all_users_without_embedding_s']:.1f} s"),
        (f"all {rows['users']} users' embedding", f"{rows['all_users_embedding_s']:.1f} s"),
        ("fallbacks to a full export", str(rows["fallbacks"])),
        ("byte-identical to enroll + export (sample)", f"{rows['identity_equal']}/{rows['identity_checked']}"),
    ):
        t.add_row(label, value)
    return t
