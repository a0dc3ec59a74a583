"""`toolchain fleet`: every user's verifier files from templates; `toolchain fleet merge`."""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.errors import CheckFailed, ToolchainError


@click.group("fleet", invoke_without_command=True)
@click.option("--hypernet", "hypernet", type=click.Path(dir_okay=False), help="Hypernet checkpoint (hypernet.pt).")
@click.option("--users", "users_src", type=click.Path(), help="A folder with one sub-folder per user (its first "
              "image, sorted, enrolls the user), or a file of `user_id<TAB>image_path` lines.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder: DIR/<user>/verifier_* "
              "and DIR/fleet_manifest.json. A rerun skips the users already there.")
@click.option("--calibration", type=click.Path(), help="Calibration images shared by every user (.npy/.npz, an "
              "image folder or a pairs file); part of the template's key.")
@click.option("--calibration-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--formats", default="executorch,tflite", show_default=True)
@click.option("--precisions", default="int8,fp32", show_default=True)
@click.option("--shard", default=None, metavar="I/N", help="Only the I-th of N hash shards of the users "
              "(run the shards on several machines, then `toolchain fleet merge`).")
@click.option("--parity", "parity_users", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run K sampled users' int8 files in their runtimes against their float models.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this machine, each a hash shard of the users; their manifests are joined.")
@click.option("--manifest-name", default="fleet_manifest.json", hidden=True)
@click.pass_context
def fleet(ctx, hypernet, users_src, out_dir, calibration, calibration_size, formats, precisions, shard,
          parity_users, workers, manifest_name) -> None:
    """Write every user's verifier files by putting that user's per-user tensors, their int8
    parameters and metadata into one template per format and precision. Files are byte-identical
    to `toolchain enroll` + `toolchain export` of the same user with the same calibration set.
    Exit 1 when a user was skipped (named by line), 0 otherwise."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [n for n, v in (("--hypernet", hypernet), ("--users", users_src), ("--out", out_dir),
                              ("--calibration", calibration)) if not v]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}")
    from toolchain.cli.common import run_logged
    from toolchain.fleet.run import parse_shard

    shard_spec = parse_shard(shard)
    if workers > 1 and shard_spec is not None:
        raise click.UsageError("--workers splits this machine's users; --shard picks one machine's: use one")
    from toolchain.fleet.run import read_users

    read_users(users_src)  # an unreadable or empty list fails here, before the templates are built
    log = Path(out_dir).parent / f"{Path(out_dir).name}.fleet.log"
    new_folder = not Path(out_dir).exists()
    try:
        with run_logged(ctx, log):
            if workers > 1:
                result = _run_workers(hypernet, users_src, out_dir, calibration, calibration_size, formats,
                                      precisions, parity_users, workers)
            else:
                result = _run(hypernet, users_src, out_dir, calibration, calibration_size, formats, precisions,
                              shard_spec, parity_users, manifest_name)
    except ToolchainError:
        if new_folder:
            _remove_empty_folders(Path(out_dir))  # bad input (a hypernet that does not load) leaves nothing
        raise
    _summary(result, out_dir)


def _remove_empty_folders(root: Path) -> None:
    """`root` and the folders under it, deepest first, where they hold no file."""
    if not root.is_dir():
        return
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def _run(hypernet, users_src, out_dir, calibration, calibration_size, formats, precisions, shard, parity_users,
         manifest_name):
    from toolchain.fleet.quality import write_fleet_report
    from toolchain.fleet.run import run_fleet
    from toolchain.console import progress_bar

    result = run_fleet(hypernet, users_src, out_dir, calibration=calibration, calibration_size=calibration_size,
                       formats=formats, precisions=precisions, shard=shard, parity_users=parity_users,
                       progress=click.echo, progress_bar=lambda what, n: progress_bar(what, n),
                       manifest_name=manifest_name)
    import json

    manifest = json.loads((Path(out_dir) / manifest_name).read_text())
    result.report = write_fleet_report(Path(out_dir), result, manifest)
    return result


def _run_workers(hypernet, users_src, out_dir, calibration, calibration_size, formats, precisions, parity_users,
                 workers):
    """`workers` processes, each `toolchain fleet --shard i/N` into the same folder with its own
    manifest; then their manifests are joined into fleet_manifest.json. Each process enrolls with
    torch's default threads, as `toolchain enroll` does, so the files stay byte-identical."""
    import json
    import subprocess
    import sys
    import time

    from toolchain.fleet.merge import merge_manifests
    from toolchain.fleet.quality import fleet_parity, write_fleet_report
    from toolchain.fleet.run import MANIFEST, FleetResult, load_engine, read_users

    out = Path(out_dir)
    t0 = time.perf_counter()
    engine = load_engine(hypernet, calibration, calibration_size, 0, formats, precisions, out / ".templates",
                         say=click.echo)  # built once here; the workers read the cache
    result = FleetResult(out, timings={"template_seconds": time.perf_counter() - t0})
    names = [f"fleet_manifest.worker-{i}.json" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "toolchain", "fleet", "--hypernet", str(hypernet), "--users",
                               str(users_src), "--out", str(out), "--calibration", str(calibration),
                               "--calibration-size", str(calibration_size), "--formats", formats, "--precisions",
                               precisions, "--shard", f"{i}/{workers}", "--manifest-name", names[i]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    click.echo(f"{workers} workers started")
    for p in procs:
        _, err = p.communicate()
        result.problems += [line[len("skipped: "):] for line in err.splitlines() if line.startswith("skipped: ")]
        if p.returncode not in (0, 1):
            raise CheckFailed(f"a fleet worker failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
    merged = merge_manifests([out / n for n in names], out)
    result.users = len(merged["users"])
    result.fallbacks = [f"{e['user']}: {e.get('reason')}" for e in merged["users"] if e["mode"] == "full"]
    result.timings["total_seconds"] = time.perf_counter() - t0
    if parity_users:
        users, _ = read_users(users_src)
        done = [u for u in users if u.user in {e["user"] for e in merged["users"]}]
        result.parity = fleet_parity(engine.bundle, done, users, out, parity_users, say=click.echo)
    result.report = write_fleet_report(out, result, json.loads((out / MANIFEST).read_text()))
    return result


def _summary(result, out_dir) -> None:
    t = result.timings
    click.echo(f"fleet: {result.users} user(s) written, {result.skipped_done} already done, "
               f"{len(result.fallbacks)} full export(s) (fallback), {len(result.problems)} skipped")
    if t.get("write_seconds") is not None and result.users:
        click.echo(f"  per user: {1000 * t['embed_seconds'] / result.users:.1f} ms embedding + generation, "
                   f"{1000 * t['write_seconds'] / result.users:.2f} ms quantising + writing; "
                   f"templates {t.get('template_seconds', 0):.1f} s")
    for f in result.fallbacks[:10]:
        click.echo(f"  full export: {f}")
    parity_failed = [r for r in result.parity if not r["passed"]]
    if result.parity:
        click.echo(f"  parity: {len(result.parity) - len(parity_failed)}/{len(result.parity)} int8 files within "
                   "the bounds")
    click.echo(f"manifest: {Path(out_dir) / 'fleet_manifest.json'}; report: {result.report}")
    for p in result.problems:
        click.echo(f"skipped: {p}", err=True)
    if result.problems:
        raise CheckFailed(f"{len(result.problems)} user(s) skipped (listed above); the others are complete")
    if parity_failed:
        raise CheckFailed(f"{len(parity_failed)} sampled int8 file(s) outside the parity bounds (see {result.report})")


@fleet.command("merge")
@click.argument("shard_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Where the joined fleet_manifest.json goes.")
def merge(shard_dirs, out_dir) -> None:
    """Join the manifests of fleet shards and check them (same templates, every shard once, no
    user twice, every file's sha256)."""
    from toolchain.fleet.merge import merge_manifests

    merged = merge_manifests(shard_dirs, out_dir)
    click.echo(f"merged {len(merged['users'])} users from {len(shard_dirs)} shard(s): "
               f"{Path(out_dir) / 'fleet_manifest.json'}")
