"""`toolchain fleet`: every user's verifier files, written from templates.

Flow: read the users -> build or reuse the templates (toolchain.fleet.templates) -> per user:
decode the enrollment image, embed it with h_bb and generate the head with h_gen as `toolchain
enroll` does, then per (format, precision) quantise the head (toolchain.quantize.head), encode its
values and write them into the template (toolchain.fleet.patch) ->
DIR/<user>/verifier_{int8,fp32}.{pte,tflite}, and DIR/fleet_manifest.json.

A user whose values cannot be written in place (toolchain.fleet.patch.PatchPlan.why_not_patchable)
gets a full export instead, counted and logged. The manifest is rewritten atomically as users
finish, so a rerun skips the users it lists and resumes after an interruption. Users that cannot
be read (an unsafe id, an undecodable image) are reported by line and skipped; the run then exits
1, and every other user's files are complete.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from toolchain.atomic import atomic_write_bytes
from toolchain.errors import ToolchainError

MANIFEST = "fleet_manifest.json"
MANIFEST_SCHEMA = "toolchain.fleet_manifest/1"
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class UserSource:
    user: str
    image: Path
    where: str  # "line 12" or the user's folder, for messages
    others: list[Path] = field(default_factory=list)  # further images of the user (folder sources)


def read_users(src: str | Path) -> tuple[list[UserSource], list[str]]:
    """(users, problems). SRC: a folder with one sub-folder per user (its first image, sorted, is
    the enrollment image), or a text file of `user_id<TAB>image_path` lines (paths relative to
    the file's folder)."""
    src = Path(src)
    users, problems = [], []
    if src.is_dir():
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            images = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                problems.append(f"{d}: no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
                continue
            users.append(UserSource(d.name, images[0], str(d), images[1:]))
    elif src.is_file():
        try:
            text = src.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ToolchainError(f"{src}: not a text list of `user_id<TAB>image_path` lines (not UTF-8)") from exc
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                problems.append(f"{src}:{i}: expected `user_id<TAB>image_path`")
                continue
            path = Path(parts[1].strip())
            users.append(UserSource(parts[0].strip(), path if path.is_absolute() else src.parent / path,
                                    f"{src}:{i}"))
    else:
        raise ToolchainError(f"{src}: no such users folder or list file")
    seen, ok = set(), []
    for u in users:
        if not SAFE_ID.fullmatch(u.user) or u.user in (".", ".."):
            problems.append(f"{u.where}: user id {u.user!r} is not a safe file name "
                            "(letters, digits, '.', '_', '-'; at most 64)")
        elif u.user in seen:
            problems.append(f"{u.where}: user id {u.user!r} appears twice")
        else:
            seen.add(u.user)
            ok.append(u)
    if not ok and not problems:
        raise ToolchainError(f"{src}: lists no users (a folder needs one sub-folder per user with an image; "
                             "a list file, `user_id<TAB>image_path` lines)")
    return ok, problems


def shard_of(user: str, shards: int) -> int:
    """The hash shard of a user id, stable across machines and Python processes."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % shards


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
        raise ToolchainError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


@dataclass
class FleetResult:
    out: Path
    users: int = 0  # written in this run
    skipped_done: int = 0  # already in the manifest
    problems: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    parity: list[dict] = field(default_factory=list)
    report: Path | None = None


def _load_manifest(out: Path, name: str = MANIFEST) -> dict:
    path = out / name
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ToolchainError(f"{path}: not valid JSON ({exc}); move it away to start over") from exc


def _done(out: Path, entry: dict) -> bool:
    return all((out / f["path"]).is_file() and (out / f["path"]).stat().st_size == f["bytes"] for f in entry["files"])


@dataclass
class Engine:
    """What writing a user's files needs, loaded once: h_bb and h_gen, the shared calibration
    set and its trunk features, and the templates."""

    bundle: object
    spec: object
    calib: np.ndarray
    features: np.ndarray
    templates: dict
    timings: dict

    def render(self, user: str, image: np.ndarray):
        """(per-user state, files) of one user from one uint8 (H, W, 3) image, as `toolchain
        enroll` + `toolchain export` would make them; files as in render_user."""
        from toolchain.train.enroll import user_theta

        state = {k: v.detach().cpu().numpy() for k, v in user_theta(self.bundle, image[None]).items()}
        return state, render_user(user, state, self.templates, self.features, self.bundle.threshold)


def load_engine(hypernet, calibration, calibration_size: int, seed: int, formats, precisions, cache: Path,
                say=None) -> Engine:
    """`hypernet`: its checkpoint's path, or the HypernetBundle a caller already loaded (to check
    it before other work) so the file is not read twice."""
    from toolchain.export.api import FORMATS, PRECISIONS, _parse_list, _prepare_calibration, trunk_features
    from toolchain.fleet.templates import build_templates
    from toolchain.models import build_model
    from toolchain.models.hypernet import HypernetBundle, load_hypernet
    from toolchain.quantize.exact_input import fold_input_normalisation

    formats = _parse_list(formats, FORMATS, "format")
    precisions = _parse_list(precisions, PRECISIONS, "precision")
    bundle = hypernet if isinstance(hypernet, HypernetBundle) else load_hypernet(hypernet)
    verifier = build_model("verifier", **bundle.hypernet.verifier_kwargs)
    verifier.features.load_state_dict(bundle.hypernet.trunk.state_dict())
    trunk_view = fold_input_normalisation(verifier) or verifier  # the form every file is exported from
    spec = trunk_view.spec
    calib = _prepare_calibration(calibration, spec, calibration_size, seed)
    t0 = time.perf_counter()
    features = trunk_features(trunk_view, calib, spec)  # shared by every user, as the trunk is
    templates, build = build_templates(bundle, calib, features, formats, precisions, cache, progress=say)
    return Engine(bundle, spec, calib, features, templates, {"template_seconds": time.perf_counter() - t0, **build})


def run_fleet(hypernet, users_src: str | Path, out: str | Path, *, calibration,
              calibration_size: int = 512, seed: int = 0, formats=("executorch", "tflite"),
              precisions=("int8", "fp32"), shard: tuple[int, int] | None = None, parity_users: int = 0,
              progress: Callable[[str], None] | None = None, progress_bar=None,
              manifest_name: str = MANIFEST) -> FleetResult:
    """Every user's files from templates; `hypernet`: a checkpoint path or a loaded bundle (load_engine)."""
    from toolchain.export.api import FORMATS, PRECISIONS, _parse_list
    from toolchain.export.metadata import tool_versions
    from toolchain.train.enroll import read_image, user_theta

    formats = _parse_list(formats, FORMATS, "format")
    precisions = _parse_list(precisions, PRECISIONS, "precision")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: None)
    result = FleetResult(out)
    t_start = time.perf_counter()

    users, problems = read_users(users_src)
    result.problems += problems
    if shard is not None:
        users = [u for u in users if shard_of(u.user, shard[1]) == shard[0]]
    manifest = _load_manifest(out, manifest_name)
    if not manifest and manifest_name != MANIFEST:  # a worker resumes from the joined manifest too
        manifest = _load_manifest(out)
    entries = {e["user"]: e for e in manifest.get("users", [])
               if shard is None or shard_of(e["user"], shard[1]) == shard[0]}
    todo = [u for u in users if not (u.user in entries and _done(out, entries[u.user]))]
    result.skipped_done = len(users) - len(todo)

    engine = load_engine(hypernet, calibration, calibration_size, seed, formats, precisions, out / ".templates",
                         say)
    bundle, calib, features, templates, spec = (engine.bundle, engine.calib, engine.features, engine.templates,
                                                engine.spec)
    result.timings.update(engine.timings)
    versions = tool_versions()
    header = {"schema": MANIFEST_SCHEMA, "hypernet_sha256": bundle.sha256,
              "calibration": {"images": int(len(calib)),
                              "sha256": hashlib.sha256(calib.tobytes()).hexdigest()},
              "templates": {f"{f}/{p}": t.template_id for (f, p), t in templates.items()},
              "tool_versions": versions, "shard": None if shard is None else f"{shard[0]}/{shard[1]}"}
    if manifest and any(manifest.get(k) != header[k] for k in ("hypernet_sha256", "calibration", "templates")):
        raise ToolchainError(f"{out / manifest_name} belongs to another hypernet, calibration set or tool versions; "
                             "use another --out folder")

    def save_manifest() -> float:
        """Compact JSON (the C encoder: a 10,000-user manifest in well under a second); returns
        the seconds it took."""
        s0 = time.perf_counter()
        text = json.dumps({**header, "users": sorted(entries.values(), key=lambda e: e["user"])},
                          separators=(",", ":"), sort_keys=True)
        atomic_write_bytes(out / manifest_name, lambda tmp: Path(tmp).write_text(text))
        return time.perf_counter() - s0

    # Per user: decode, embed and generate exactly as `toolchain enroll` does (one image at a time:
    # batched convolutions round differently, and byte identity needs the same floats), then
    # quantise, encode and write. Unreadable images are reported by line and skipped.
    t_embed = t_write = 0.0
    t0 = last_save = time.perf_counter()
    save_every = 5.0
    done_users = []
    try:
        with (progress_bar("users", len(todo)) if progress_bar else _null()) as advance:
            for u in todo:
                try:
                    image = read_image(u.image, spec.input_size[1:])
                except ToolchainError as exc:
                    result.problems.append(f"{u.where}: {exc}")
                    advance(1)
                    continue
                e0 = time.perf_counter()
                state = {k: v.detach().cpu().numpy() for k, v in user_theta(bundle, image[None]).items()}
                t_embed += time.perf_counter() - e0
                entry = _write_user(u.user, state, templates, features, bundle.threshold, out)
                t_write += entry.pop("_patch_seconds")
                if entry.get("_fallback"):
                    reason = entry.pop("_fallback")
                    result.fallbacks.append(f"{u.user}: {reason}")
                    entry = _full_export(bundle, u.user, state, calib, formats, precisions, out, reason)
                entries[u.user] = entry
                done_users.append(u)
                result.users += 1
                advance(1)
                if time.perf_counter() - last_save > save_every:  # resumable: finished users are recorded
                    # At most ~5% of the time goes to saving, however large the manifest grows.
                    save_every = max(5.0, 20 * save_manifest())
                    last_save = time.perf_counter()
    finally:  # an interrupted run keeps what it finished: a rerun resumes after it
        save_manifest()
    result.timings.update(users_seconds=time.perf_counter() - t0, embed_seconds=t_embed, write_seconds=t_write,
                          total_seconds=time.perf_counter() - t_start)
    if parity_users > 0 and done_users:
        from toolchain.fleet.quality import fleet_parity

        result.parity = fleet_parity(bundle, done_users, users, out, parity_users, seed=seed, say=say)
    return result


class _null:
    def __enter__(self):
        return lambda n=1, **kw: None

    def __exit__(self, *exc):
        return False


def render_user(user: str, state: dict, templates: dict, features: np.ndarray,
                threshold: float) -> tuple[list[dict], dict[str, bytes]] | str:
    """One user's files from the templates, in memory: ([file records], {file name: bytes}), or the
    reason they cannot be patched (the caller then exports in full)."""
    from toolchain.fleet.templates import template_values
    from toolchain.quantize.head import quantize_head

    per_user = sorted(state)
    heads: dict[float, object] = {}  # the head's input scale may differ between the formats' templates
    files, blobs = [], {}
    for (fmt, precision), t in templates.items():
        head = None
        if precision == "int8":
            if t.feature_scale not in heads:
                heads[t.feature_scale] = quantize_head(state, per_user, features, t.feature_scale, threshold)
            head = heads[t.feature_scale]
        vals = template_values(t, user, state, head)
        why = t.plan.why_not_patchable(vals, t.values)
        if why is not None:
            return f"{fmt} {precision}: {why}"
        data = t.plan.apply(t.data, vals)
        blobs[t.file_name] = data
        files.append({"path": f"{user}/{t.file_name}", "format": fmt, "precision": precision, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest(), "template": t.template_id})
    return files, blobs


def _write_user(user: str, state: dict, templates: dict, features: np.ndarray, threshold: float,
                out: Path) -> dict:
    t0 = time.perf_counter()
    rendered = render_user(user, state, templates, features, threshold)
    seconds = time.perf_counter() - t0
    if isinstance(rendered, str):
        return {"_fallback": rendered, "_patch_seconds": seconds}
    files, blobs = rendered
    folder = out / user
    folder.mkdir(exist_ok=True)
    for name, data in blobs.items():
        atomic_write_bytes(folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return {"user": user, "files": files, "threshold": float(threshold), "mode": "patched",
            "_patch_seconds": seconds}


def _full_export(bundle, user: str, state: dict, calib: np.ndarray, formats, precisions, out: Path,
                 reason: str) -> dict:
    """A user the templates cannot hold: enrolled and exported in full, as `toolchain export` does."""
    import logging
    import tempfile

    import torch

    from toolchain.export import export_model
    from toolchain.models.io import save_enrollment

    logging.getLogger("toolchain.fleet").warning("user %s: full export (%s)", user, reason)
    verifier = bundle.hypernet.build_verifier({k: torch.from_numpy(v) for k, v in state.items()})
    with tempfile.TemporaryDirectory(prefix="toolchain-fleet-full-") as tmp:
        udir = save_enrollment(Path(tmp) / user, verifier, bundle.hypernet.verifier_kwargs, bundle.threshold,
                               user=user, num_images=1, hypernet=None, hypernet_sha256=bundle.sha256,
                               backbone=bundle.meta["backbone"]["model"],
                               threshold_source="held-out identities at hypernet training (max balanced accuracy)")
        recs = export_model(udir, Path(tmp) / "out", formats, precisions, calib, calibration_size=len(calib),
                            progress=False)
        folder = out / user
        folder.mkdir(exist_ok=True)
        files = []
        for r in recs:
            data = Path(r.path).read_bytes()
            atomic_write_bytes(folder / r.file, lambda tmp_, data=data: Path(tmp_).write_bytes(data))
            files.append({"path": f"{user}/{r.file}", "format": r.format, "precision": r.precision,
                          "bytes": len(data), "sha256": r.sha256, "template": None})
    return {"user": user, "files": files, "threshold": float(bundle.threshold), "mode": "full",
            "reason": reason}
