"""The recipe's stages, wired to the stage libraries (data, train, export, profile, parity).

Each function here is glue: it reads the recipe section and earlier stages' records, calls the
library that owns the work, and returns the files it wrote plus a JSON record. No stage holds
the logic of another package (training, export, metrics, parity live in their own modules).

Verifier route:  data -> train_backbone -> train_hypernet -> enroll -> evaluate -> export
                 -> profile -> parity          (report is appended by the runner)
Embedding route: data -> [train_backbone] -> evaluate -> export -> profile -> parity
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.pipeline.core import RunContext, Stage, StageOutput, read_json
from toolchain.recipe import Recipe

# Config fields that change how a stage runs, not what it produces: excluded from cache keys.
_RUNTIME_FIELDS = {"progress", "num_workers", "checkpoint_every"}


# ----------------------------------------------------------------------------------------- data


def _data_files(ctx: RunContext) -> tuple[Path, Path]:
    """(identity data set path, verification pairs path) of this run. A folder source gets its
    pairs from the `pairs` stage (built once the backbone can find look-alikes)."""
    rec = ctx.results["data"]
    train = Path(rec["train"])
    pairs = Path(ctx.results["pairs"]["pairs"] if "pairs" in ctx.results else rec.get("pairs", ""))
    return (train if train.is_absolute() else ctx.path(train)), (pairs if pairs.is_absolute() else ctx.path(pairs))


def _external_data(ctx: RunContext) -> list[Path]:
    """Real data lives outside the run folder: its files are inputs by fingerprint."""
    if ctx.recipe.data.source != "insightface":
        return []
    return [Path(p) for p in ctx.results["data"]["inputs"]]


def _backbone_inputs(ctx: RunContext) -> list[Path]:
    """The training data's files, and the checkpoint the backbone starts from (`init`)."""
    init = ctx.recipe.train.backbone.init
    return _external_data(ctx) + ([Path(init)] if init else [])


def _stage_data(ctx: RunContext) -> StageOutput:
    d = ctx.recipe.data
    train_name, pairs_name = d.files()
    if d.source == "folder":
        return _stage_data_folder(ctx)
    if d.source == "synthetic":
        import os

        from toolchain.data import write_synthetic

        out = ctx.path("data")
        # The insightface layout (train.rec + a verification .bin): the same readers as real data.
        info = write_synthetic(out, fmt="insightface", overwrite=True, workers=max(1, min(4, os.cpu_count() or 1)),
                               **d.synthetic.generator_kwargs())
        train, pairs = out / train_name, out / pairs_name
        for p in (train, pairs):
            if not p.exists():
                raise ToolchainError(f"synthetic data: {p.name} was not written (data.train / data.pairs name "
                                     f"a file the generator does not write)")
        if pairs.name == "synthetic.bin":  # the generator's own pairs: keep who is in each (diagnosis)
            from toolchain.data.split import PAIR_IDENTITIES, write_pair_identities
            from toolchain.data.writers import benchmark_for

            rows = benchmark_for(**d.synthetic.generator_kwargs()).pair_list()
            write_pair_identities(out / PAIR_IDENTITIES, rows[:, 0], rows[:, 2])
        return StageOutput(files=[out], data={"source": "synthetic", "train": ctx.rel(train),
                                              "pairs": ctx.rel(pairs), "generator": _jsonable(info)})
    root = Path(d.root).expanduser()
    if not root.is_dir():
        raise ToolchainError(f"data.root: {root} is not a folder")
    train, pairs = root / train_name, root / pairs_name
    for p, key in ((train, "data.train"), (pairs, "data.pairs")):
        if not p.exists():
            raise ToolchainError(f"{key}: {p} does not exist")
    inputs = [train, pairs]
    if train.suffix == ".rec":
        inputs += [p for p in (train.with_suffix(".idx"), root / "property") if p.exists()]
    return StageOutput(data={"source": "insightface", "root": str(root.resolve()), "train": str(train.resolve()),
                             "pairs": str(pairs.resolve()), "inputs": [str(p.resolve()) for p in inputs]})


def _folder_images(ctx: RunContext):
    from toolchain.data.folder import scan_identity_folder

    root = Path(ctx.recipe.data.root).expanduser()
    if not root.is_dir():
        raise ToolchainError(f"data.root: {root} is not a folder")
    return root, *scan_identity_folder(root)


def _folder_inputs(ctx: RunContext) -> list[Path]:
    return _folder_images(ctx)[1] if ctx.recipe.data.source == "folder" else []


def _stage_data_folder(ctx: RunContext) -> StageOutput:
    """Split the folder's identities; training identities go into `data/train.rec` (the image
    bytes as they are), the held-out ones are listed in `data/held_out.json` for the pairs stage."""
    from toolchain.atomic import write_json_atomic
    from toolchain.data.recordio import write_insightface_rec
    from toolchain.data.split import split_identities

    d = ctx.recipe.data
    root, paths, labels, names = _folder_images(ctx)
    train_ids, held_ids = split_identities(labels, d.held_out, d.split_seed)
    out = ctx.path("data")
    out.mkdir(parents=True, exist_ok=True)
    keep = np.flatnonzero(np.isin(labels, train_ids))
    relabel = {int(old): new for new, old in enumerate(train_ids)}
    write_insightface_rec(out, (paths[i].read_bytes() for i in keep), [relabel[int(labels[i])] for i in keep])
    held = np.flatnonzero(np.isin(labels, held_ids))
    write_json_atomic(out / "held_out.json", {
        "root": str(root.resolve()), "identities": [names[i] for i in held_ids],
        "images": [str(paths[i].relative_to(root)) for i in held], "labels": [int(labels[i]) for i in held]})
    return StageOutput(files=[out], data={
        "source": "folder", "root": str(root.resolve()), "train": ctx.rel(out / "train.rec"),
        "held_out": ctx.rel(out / "held_out.json"), "train_identities": int(len(train_ids)),
        "train_images": int(len(keep)), "held_out_identities": int(len(held_ids)), "held_out_images": int(len(held)),
        "split_seed": d.split_seed})


def _stage_pairs(ctx: RunContext) -> StageOutput:
    """Verification pairs among the held-out identities of a folder source, written as an
    insightface `.bin`; hard negatives are look-alikes in the trained backbone's space."""
    from toolchain.data.insightface_bin import write_bin
    from toolchain.data.folder import read_image_file
    from toolchain.data.split import PAIR_IDENTITIES, build_pairs, write_pair_identities
    from toolchain.models.io import load_model
    from toolchain.models.inputs import embed, nhwc_uint8_to_input

    d = ctx.recipe.data
    held = json.loads(ctx.path(ctx.results["data"]["held_out"]).read_text())
    root = Path(held["root"])
    files = [root / rel for rel in held["images"]]
    labels = np.asarray(held["labels"])
    embeddings = None
    if d.hard_negatives > 0:
        backbone, _ = load_model(ctx.path(ctx.results["train_backbone"]["checkpoint"]))
        images = np.stack([read_image_file(f) for f in files])
        embeddings = embed(backbone, nhwc_uint8_to_input(images)).numpy()
    rows = build_pairs(labels, d.pair_count, hard_share=d.hard_negatives, seed=d.split_seed, embeddings=embeddings)
    out = ctx.path("pairs/pairs.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bin(out, [files[i].read_bytes() for r in rows for i in r[:2]], rows[:, 2].astype(bool))
    write_pair_identities(out.parent / PAIR_IDENTITIES, labels[rows[:, 0]], labels[rows[:, 1]])
    return StageOutput(files=[out, out.parent / PAIR_IDENTITIES], data={"pairs": ctx.rel(out), "num_pairs": int(len(rows)),
                                          "matched": int(rows[:, 2].sum()), "hard_negative_share": d.hard_negatives,
                                          "identities": int(len(np.unique(labels[rows[:, :2].ravel()])))})


def _jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return str(obj)


def _identity_dataset(ctx: RunContext):
    from toolchain.data import load_identity_dataset

    return load_identity_dataset(_data_files(ctx)[0])


def _pairs(ctx: RunContext, max_pairs: int | None):
    from toolchain.data import load_pairs

    pairs = load_pairs(_data_files(ctx)[1])
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = pairs.subset(max_pairs)
    return pairs


# ------------------------------------------------------------------------------------- training


def _stage_train_backbone(ctx: RunContext) -> StageOutput:
    from toolchain.train import train_backbone

    cfg = ctx.recipe.train.backbone
    ckpt = train_backbone(cfg, _identity_dataset(ctx), ctx.path("train/backbone"), resume=True)
    return StageOutput(files=[ckpt], data={"checkpoint": ctx.rel(ckpt), "model": cfg.model,
                                           "embedding_size": cfg.embedding_size})


def _stage_train_hypernet(ctx: RunContext) -> StageOutput:
    from toolchain.models.io import load_state
    from toolchain.train import train_hypernet

    backbone = ctx.path(ctx.results["train_backbone"]["checkpoint"])
    ckpt = train_hypernet(ctx.recipe.train.hypernet, backbone, _identity_dataset(ctx),
                          ctx.path("train/hypernet"), resume=True)
    payload = load_state(ckpt)
    return StageOutput(files=[ckpt], data={
        "checkpoint": ctx.rel(ckpt), "threshold": float(payload["threshold"]),
        "calibration": _jsonable(payload.get("calibration", {})),
        "held_out_identities": [int(i) for i in payload.get("val_identities", [])]})


# ------------------------------------------------------------------------------------ enrollment


def _stage_enroll(ctx: RunContext) -> StageOutput:
    """Enroll users held out from h_gen's training; keep each user's probes for later stages.

    Users are the first `enroll.users` identities h_gen never trained on (the hypernet's held-out
    split). Per user: `enroll_images` images enroll, the rest of their images are positive probes;
    negatives are images of the verification pairs (identities disjoint from training).
    """
    from toolchain.atomic import atomic_write_bytes
    from toolchain.runtime import load_runner
    from toolchain.train import enroll_images

    cfg = ctx.recipe.enroll
    held_out = ctx.results["train_hypernet"]["held_out_identities"]
    if len(held_out) < cfg.users:
        raise ToolchainError(f"enroll.users={cfg.users}: only {len(held_out)} identities are held out from "
                             f"hypernet training (raise train.hypernet.val_identities or lower enroll.users)")
    dataset = _identity_dataset(ctx)
    labels = np.asarray(dataset.labels)
    hypernet = ctx.path(ctx.results["train_hypernet"]["checkpoint"])
    negatives = _negative_images(ctx)
    users_dir = ctx.path("users")
    users, files = [], []
    for ident in held_out[:cfg.users]:
        items = np.flatnonzero(labels == ident)
        if len(items) <= cfg.enroll_images:
            raise ToolchainError(f"identity {ident} has {len(items)} images; enrolling {cfg.enroll_images} "
                                 "leaves no probe")
        images = np.stack([dataset.get_uint8(int(i)) for i in items])
        enroll, positives = images[:cfg.enroll_images], images[cfg.enroll_images:]
        name = f"user_{int(ident):05d}"
        user_dir = enroll_images(hypernet, enroll, users_dir / name, user=name)
        atomic_write_bytes(user_dir / "probes.npz",
                           lambda tmp: _savez(tmp, enroll=enroll, positives=positives))
        # The user's own view of the float verifier at the shipped threshold.
        runner = load_runner(user_dir)
        threshold = float(runner.threshold)
        pos = runner.run(positives)[:, 0]
        neg = runner.run(negatives)[:, 0]
        tar, far = float((pos >= threshold).mean()), float((neg >= threshold).mean())
        n = len(pos) + len(neg)
        users.append({"user": name, "identity": int(ident), "dir": ctx.rel(user_dir), "threshold": threshold,
                      "tar": tar, "far": far, "accuracy": float(((pos >= threshold).sum() + (neg < threshold).sum()) / n),
                      "positives": int(len(pos)), "negatives": int(len(neg)), "probes": int(n)})
        files.append(user_dir)
    return StageOutput(files=files, data={"users": users, "negatives": int(len(negatives)),
                                          "note": "users are identities held out from hypernet training; "
                                                  "negatives are verification-pair images"})


def _savez(path: str, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez_compressed(f, **arrays)


def _negative_images(ctx: RunContext) -> np.ndarray:
    """Up to `parity.max_negatives` distinct images of the verification pairs: the shared
    negative probes of every user (pair identities are disjoint from the enrolled ones)."""
    images, _, _ = _pairs(ctx, None).distinct()  # pairs reuse images: count each once
    return images[:ctx.recipe.parity.max_negatives]


def _user_probes(ctx: RunContext, user: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(enrollment images, probe images, probe labels 1 = the user) of one enrolled user."""
    with np.load(ctx.path(user["dir"]) / "probes.npz") as z:
        enroll, positives = z["enroll"], z["positives"]
    negatives = _negative_images(ctx)
    images = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    return enroll, images, labels


# ------------------------------------------------------------------------------------ evaluation


def _stage_evaluate(ctx: RunContext) -> StageOutput:
    cfg = ctx.recipe.evaluate
    pairs = _pairs(ctx, cfg.max_pairs)
    if ctx.recipe.kind == "verifier":
        from toolchain.evaluate.per_user import evaluate_pairs

        hypernet = ctx.path(ctx.results["train_hypernet"]["checkpoint"])
        result = evaluate_pairs(hypernet, pairs)
        route = "symmetric" if cfg.symmetric else "per_user"
        data = {"per_user": _metrics_summary(result[route]), "per_user_route": route,
                "per_user_at_threshold": _jsonable(result["per_user_at_threshold"]),
                "backbone": _metrics_summary(result["backbone_cosine"]),
                "backbone_model": ctx.recipe.train.backbone.model, "pairs": int(result["num_pairs"]),
                "routes": {k: _metrics_summary(result[k]) for k in ("per_user", "symmetric", "backbone_cosine")}}
        data["diagnosis"] = _diagnosis(ctx, hypernet, pairs)
    else:
        from toolchain.evaluate.metrics import verification_metrics
        from toolchain.evaluate.parity import pair_scores
        from toolchain.runtime import load_runner

        # The insightface protocol, as parity scores it: image + mirror embeddings, cosine.
        scores, _, _ = pair_scores(load_runner(_embedding_source(ctx)), pairs)
        data = {"backbone": _metrics_summary(verification_metrics(scores, pairs.issame)),
                "backbone_model": ctx.recipe.export.model or ctx.recipe.train.backbone.model,
                "pairs": int(len(pairs)), "note": "cosine of the float embeddings (image + mirror)"}
    data["pairs_file"] = ctx.rel(_data_files(ctx)[1])
    return StageOutput(data=data)


def _diagnosis(ctx: RunContext, hypernet: Path, pairs) -> dict:
    """Trunk cosine and the fitted-head upper bound on the same pairs (toolchain.evaluate.diagnose);
    needs the person of each pair image, known when the run made the pairs."""
    from toolchain.data.split import read_pair_identities
    from toolchain.evaluate.diagnose import diagnose, negative_sample
    from toolchain.models.hypernet import load_hypernet

    identities = read_pair_identities(_data_files(ctx)[1])
    if identities is None or len(identities[0]) != len(pairs):
        return {"note": "pair identities unknown (pairs not made by this run): no diagnosis"}
    negatives = negative_sample(_identity_dataset(ctx), seed=ctx.recipe.seed)
    result = diagnose(load_hypernet(hypernet).hypernet, pairs, identities, negatives)
    return {"trunk_cosine": _metrics_summary(result["trunk_cosine"]),
            "head_upper_bound": _metrics_summary(result["head_upper_bound"]),
            "upper_bound_images": result["upper_bound_images"]}


def _metrics_summary(m: dict) -> dict:
    keys = ("accuracy", "accuracy_std", "threshold", "auc", "eer", "tar_at_far", "folds", "num_pairs")
    out = {k: _jsonable(m[k]) for k in keys if k in m}
    out["pairs"] = out.pop("num_pairs", None)
    return out


def _embedding_source(ctx: RunContext) -> Path | str:
    """The float embedding model of the embedding route: the trained checkpoint or a registry name."""
    if "train_backbone" in ctx.results:
        return ctx.path(ctx.results["train_backbone"]["checkpoint"])
    return ctx.recipe.export.model


# ---------------------------------------------------------------------------------------- export


def _stage_export(ctx: RunContext) -> StageOutput:
    from toolchain.export import export_model
    from toolchain.quantize.calibration import build_calibration_set, identity_calibration_set

    cfg = ctx.recipe.export
    out_root = ctx.path("export")
    artifacts, files = [], []
    jobs: list[tuple[str | None, Any, Path, Any]] = []
    identity = None  # identity images for QAT and the int8 fallback
    if _fleet_export(ctx):
        return _stage_export_fleet(ctx)
    targets = _fallback_targets(ctx)
    aim = None  # the agreement target, with the fallback on
    if ctx.recipe.kind == "verifier":
        users = ctx.results["enroll"]["users"]
        for user in users[:cfg.users] if cfg.users else users:
            enroll, images, labels = _user_probes(ctx, user)
            calib = None
            if "int8" in cfg.precisions:
                calib = build_calibration_set("verifier", enrollment=enroll, negatives=images[~labels],
                                              size=cfg.calibration_images, seed=ctx.recipe.seed)
            jobs.append((user["user"], ctx.path(user["dir"]), out_root / user["user"], calib))
    else:
        calib = None
        if "int8" in cfg.precisions:
            ds = _identity_dataset(ctx)
            calib = identity_calibration_set(ds, cfg.calibration_images, ctx.recipe.seed)
            if any(o.qat_steps or o.fallback for o in _int8_options(cfg)):  # they train on / measure with these
                identity = np.stack([ds.get_uint8(i) for i in range(len(ds))])
            if any(o.fallback for o in _int8_options(cfg)):
                aim = _agreement_target(ctx)
                targets |= {k: aim[k] for k in ("score_threshold", "max_score_noise")}
        jobs.append((None, _embedding_source(ctx), out_root, calib))
    for user, source, out_dir, calib in jobs:
        records = export_model(source, out_dir, cfg.formats, cfg.precisions, calib,
                               calibration_size=cfg.calibration_images, tflite_backend=cfg.tflite_backend,
                               seed=ctx.recipe.seed, int8=cfg.int8.model_dump(), identity_images=identity,
                               fallback_targets=targets)
        for r in records:
            entry = {"path": ctx.rel(r.path), "format": r.format, "precision": r.precision, "bytes": int(r.bytes),
                     "sha256": r.sha256, "backend": r.backend, "model": r.model, "source": ctx.rel(source)
                     if isinstance(source, Path) else str(source), "outside": _outside(r.checks)}
            if user is not None:
                entry["user"] = user
            artifacts.append(entry)
            files.append(Path(r.path))
        files += [f for f in out_dir.iterdir() if f.is_file() and f.suffix in (".json", ".pt")]
    recovery = (read_json(out_root / "export_manifest.json") or {}).get("int8_recovery") \
        if ctx.recipe.kind == "embedding" else None
    if recovery and aim:
        recovery["agreement_target"] = aim
    return StageOutput(files=files, data={"artifacts": artifacts, **({"int8_recovery": recovery} if recovery else {})})


def _agreement_target(ctx: RunContext) -> dict:
    """The int8 fallback's agreement target (toolchain.evaluate.flips.agreement_target): from the
    float model's scores of the pairs parity judges, those that set its decision threshold. Only
    float scores are read; each fallback measures its int8 noise on its identity images."""
    from toolchain.evaluate.flips import agreement_target
    from toolchain.evaluate.parity import pair_scores
    from toolchain.runtime import load_runner

    p = ctx.recipe.parity
    pairs = _pairs(ctx, p.max_pairs)
    scores, _, _ = pair_scores(load_runner(_embedding_source(ctx)), pairs)  # as parity scores the float model
    return agreement_target(scores, pairs.issame, p.min_decision_agreement,
                            risk=ctx.recipe.export.int8.agreement_risk)


def _int8_options(cfg) -> list:
    """The int8 options of each format the recipe exports (`export.int8` and its per-format keys)."""
    from toolchain.quantize.int8_options import Int8Options

    return [Int8Options.from_any(cfg.int8, f) for f in cfg.formats]


def _fleet_export(ctx: RunContext) -> bool:
    """Several users' verifiers are written from templates (toolchain.fleet), one user's exported
    in full. The fleet enrolls from one image, converts with onnx2tf and builds its templates with
    the default int8 method; other `export.int8` settings export every user in full."""
    cfg = ctx.recipe.export
    return (ctx.recipe.kind == "verifier" and (cfg.users is None or cfg.users > 1)
            and ctx.recipe.enroll.enroll_images == 1 and cfg.tflite_backend == "onnx2tf"
            and cfg.int8 == type(cfg.int8)())


def _stage_export_fleet(ctx: RunContext) -> StageOutput:
    """Every exported user through `toolchain.fleet.run_fleet`: their enrollment images as a
    users folder, and one calibration set shared by all (the verification pairs' impostor images)."""
    from PIL import Image

    from toolchain.fleet import run_fleet
    from toolchain.quantize.calibration import build_calibration_set, identity_calibration_set

    cfg = ctx.recipe.export
    out_root = ctx.path("export")
    users = ctx.results["enroll"]["users"]
    users = users[:cfg.users] if cfg.users else users
    src = out_root / ".fleet_users"
    negatives = None
    for user in users:
        enroll, images, labels = _user_probes(ctx, user)
        negatives = images[~labels]
        (src / user["user"]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(enroll[0]).save(src / user["user"] / "0.png")
    calib_path = out_root / ".fleet_calibration.npy"
    np.save(calib_path, build_calibration_set("backbone", images=negatives, size=cfg.calibration_images,
                                              seed=ctx.recipe.seed))
    result = run_fleet(ctx.path(ctx.results["train_hypernet"]["checkpoint"]), src, out_root,
                       calibration=calib_path, calibration_size=cfg.calibration_images, seed=ctx.recipe.seed,
                       formats=cfg.formats, precisions=cfg.precisions)
    if result.problems:
        raise ToolchainError("fleet export: " + "; ".join(result.problems))
    manifest = json.loads((out_root / "fleet_manifest.json").read_text())
    artifacts, files = [], [out_root / "fleet_manifest.json"]
    for e in manifest["users"]:
        source = next(u for u in users if u["user"] == e["user"])["dir"]
        for f in e["files"]:
            path = out_root / f["path"]
            artifacts.append({"path": ctx.rel(path), "format": f["format"], "precision": f["precision"],
                              "bytes": int(f["bytes"]), "sha256": f["sha256"],
                              "backend": "xnnpack" if f["format"] == "executorch" else "onnx2tf", "model": "verifier",
                              "source": source, "outside": {}, "user": e["user"], "mode": e["mode"]})
            files.append(path)
    return StageOutput(files=files, data={"artifacts": artifacts, "fleet": {
        "templates": manifest["templates"], "fallbacks": result.fallbacks,
        "seconds": {k: round(v, 3) for k, v in result.timings.items() if isinstance(v, float)}}})


def _outside(checks: dict) -> dict[str, int]:
    """{op (where): count} of what the artifact's int8/delegate checks left out: ops kept in float
    (e.g. PReLU), ops outside the XNNPACK delegate, TFLite ops LiteRT's XNNPACK cannot run."""
    d, t = checks.get("delegation") or {}, checks.get("tflite") or {}
    out: dict[str, int] = {}
    for key, where in (("ops_outside", "outside delegate"), ("float_ops", "float"),
                       ("float_prefix_ops", "float prefix"), ("xnnpack_float_nodes", "float in XNNPACK")):
        out.update({f"{k} ({where})": int(v) for k, v in (d.get(key) or {}).items()})
    if t.get("is_int8"):  # the check lists ops XNNPACK cannot run in int8 (float PReLU it runs)
        out.update({f"{k} (not XNNPACK)": int(v) for k, v in (t.get("xnnpack_unsupported") or {}).items()})
    return out


# ----------------------------------------------------------------------------------- profile/budgets


def _float_model(ctx: RunContext):
    from toolchain.models.io import load_model

    if ctx.recipe.kind == "verifier":
        return load_model(ctx.path(ctx.results["enroll"]["users"][0]["dir"]))[0]
    source = _embedding_source(ctx)
    if isinstance(source, Path):
        return load_model(source)[0]
    from toolchain.models import build_model

    return build_model(source).eval()


def _stage_profile(ctx: RunContext) -> StageOutput:
    from toolchain.profile import evaluate_budgets, load_budgets, profile_model

    model = _float_model(ctx)
    prof = profile_model(model)
    subject = prof["model"]
    b = ctx.recipe.budgets
    budgets: dict[str, dict] = {}
    measured: dict[str, dict] = {subject: prof}
    counts = {k: v for k, v in (("max_params", b.max_params), ("max_macs", b.max_macs),
                                ("max_flops", b.max_flops)) if v is not None}
    if counts:
        budgets[subject] = counts
    file_subjects: dict[str, str] = {}
    for a in ctx.results["export"]["artifacts"]:
        limit = {"int8": b.max_int8_bytes, "fp32": b.max_fp32_bytes}.get(a["precision"])
        if limit is not None:
            budgets[a["path"]] = {"file": str(ctx.path(a["path"]).resolve()), "max_bytes": limit}
            measured[a["path"]] = {"bytes": ctx.path(a["path"]).stat().st_size}
            file_subjects[a["path"]] = a["path"]
    rows = []
    if budgets:
        for r in evaluate_budgets(load_budgets(budgets), measured):
            row = r.to_dict()
            subject_name = r.name.rsplit(".", 1)[0]
            if subject_name in file_subjects:
                row["artifact"] = file_subjects[subject_name]
            rows.append(row)
    zoo = {}
    for name in ctx.recipe.report.compare_backbones:
        p = profile_model(name)
        zoo[name] = {"params": p["params"], "macs": p["macs"], "flops": p["flops"]}
    if ctx.recipe.kind == "verifier":  # h_bb as trained (its embedding size changes the count)
        from toolchain.models.io import load_model

        bb, meta = load_model(ctx.path(ctx.results["train_backbone"]["checkpoint"]))
        p = profile_model(bb)
        zoo[f"{meta['model']} (h_bb as trained)"] = {"params": p["params"], "macs": p["macs"],
                                                       "flops": p["flops"], "model_kwargs": meta.get("model_kwargs", {})}
    summary = {k: prof[k] for k in ("model", "input_shape", "params", "macs", "flops", "elementwise_ops",
                                    "unsupported_ops", "convention") if k in prof}
    summary["files"] = {a["path"]: a["bytes"] for a in ctx.results["export"]["artifacts"]}
    return StageOutput(data={"profile": summary, "budgets": rows, "zoo": zoo})


# ------------------------------------------------------------------------------------------ parity


def _stage_parity(ctx: RunContext) -> StageOutput:
    """Each artifact in its runtime against its float model (toolchain.evaluate.parity).

    Verifier: the user's probe set (their own images + verification-pair negatives), decisions at
    the enrollment threshold. Embedding model: the verification pairs, cosine of embeddings.
    """
    from toolchain.evaluate.parity import ProbeSet, run_parity

    p = ctx.recipe.parity
    bounds = {k: getattr(p, k) for k in ("max_accuracy_drop", "min_decision_agreement", "max_tar_drop",
                                         "min_embedding_cosine_mean", "min_embedding_cosine_min")}
    rows, scores, arm_rows = [], {}, []
    groups: dict[str, list[dict]] = {}
    for a in ctx.results["export"]["artifacts"]:
        groups.setdefault(a.get("user") or "", []).append(a)
    for user, group in groups.items():
        if ctx.recipe.kind == "verifier":
            u = next(x for x in ctx.results["enroll"]["users"] if x["user"] == user)
            _, images, labels = _user_probes(ctx, u)
            eval_set = ProbeSet(images, labels, name=user)
            reference = ctx.path(u["dir"])
        else:
            eval_set = _pairs(ctx, p.max_pairs)
            reference = _embedding_source(ctx)
        results = run_parity([ctx.path(a["path"]) for a in group], eval_set, reference, bounds,
                             repeats=p.latency_runs)
        if p.arm64:
            from toolchain.evaluate.arm64 import arm_parity

            tflite = [a for a in group if a["format"] == "tflite"]
            for a, res in zip(tflite, arm_parity([ctx.path(a["path"]) for a in tflite], eval_set, reference, bounds,
                                                 sample=p.arm64_sample, cpu=p.arm64_cpu)):
                arm_rows.append({**{k: _jsonable(v) for k, v in res.items()}, "artifact": a["path"],
                                 **({"user": a["user"]} if a.get("user") else {})})
        for a, res in zip(group, results):
            row = {k: _jsonable(v) for k, v in res.items() if k not in ("scores", "float_scores", "issame")}
            row["artifact"] = a["path"]
            row["format"], row["precision"] = a["format"], a["precision"]
            if a.get("user"):
                row["user"] = a["user"]
            rows.append(row)
            scores[a["path"]] = {"labels": res["issame"], "float": res["float_scores"], "artifact": res["scores"],
                                 "source": user or "float"}
    from toolchain.environment import cpu_facts

    files = []
    data: dict[str, Any] = {"rows": rows, "units": "accuracy, float_accuracy, decision_agreement in percent; "
                                                   "accuracy_drop in points",
                            "cpu": cpu_facts()}  # the latencies were measured here
    if p.arm64:
        data["arm64"] = arm_rows
    if scores:
        out = ctx.path("parity/scores.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores))
        files.append(out)
        data["scores"] = ctx.rel(out)
    return StageOutput(files=files, data=data)


# -------------------------------------------------------------------------------------- the list


def _fallback_targets(ctx: RunContext) -> dict:
    """The int8 fallback aims at the parity section's cosine bounds and, for an embedding model,
    its agreement bound (the export stage adds that target, _agreement_target); the .tflite's
    keeps within the int8 size budget."""
    p = ctx.recipe.parity
    return {"min_cosine_mean": p.min_embedding_cosine_mean, "min_cosine_min": p.min_embedding_cosine_min,
            "min_decision_agreement": p.min_decision_agreement, "max_int8_bytes": ctx.recipe.budgets.max_int8_bytes}


def _fallback_targets_key(ctx: RunContext) -> dict:
    """With the fallback on, its targets key the export stage."""
    if not ctx.recipe.export.int8.fallback:
        return {}
    return {"fallback_targets": list(_fallback_targets(ctx).values())}


def _train_config(section) -> dict:
    return section.model_dump(mode="json", exclude=_RUNTIME_FIELDS)


def check_int8_module_names(recipe: Recipe) -> None:
    """Names in export.int8.float_layers and full_range_layers must be modules of the model:
    checked before any stage (and by `toolchain run` before it writes to the run folder), so a
    typo exits 2 before training rather than at the export stage. A model the registry does not
    know (a checkpoint path) is checked at export."""
    from toolchain.models import build_model, list_models

    int8 = recipe.export.int8
    named = {"float_layers": int8.float_layers, "full_range_layers": int8.full_range_layers}
    backbone = recipe.train.backbone
    name = backbone.model if backbone is not None else recipe.export.model
    if recipe.kind != "embedding" or not any(named.values()) or name not in list_models():
        return
    kwargs = {"embedding_size": backbone.embedding_size} if backbone is not None else {}
    modules = dict(build_model(name, **kwargs).named_modules())
    for key, names in named.items():
        unknown = [n for n in names if n not in modules]
        if unknown:
            blocks = [n for n in modules if n.count(".") == 1][:4]
            raise ToolchainError(f"export.int8.{key}: {', '.join(unknown)} not a module of {name} "
                                 f"(blocks are named like {', '.join(blocks)})")


def check_recipe_inputs(recipe: Recipe) -> None:
    """The models, checkpoint, data root and int8 module names a recipe names exist: checked
    before any stage, so a typo exits 2 before the data stage writes its files rather than after it."""
    from toolchain.models import list_models
    from toolchain.train.backbone import check_backbone_model, read_init

    backbone = recipe.train.backbone
    if backbone is not None:
        check_backbone_model(backbone.model)  # an unknown name: the known ones, in one line
        if backbone.init:
            if not Path(backbone.init).is_file():
                raise ToolchainError(f"train.backbone.init: {backbone.init} does not exist")
            read_init(backbone.init, backbone.model)
    d = recipe.data
    if d.source in ("insightface", "folder"):
        root = Path(d.root).expanduser()
        if not root.is_dir():
            raise ToolchainError(f"data.root: {root} is not a folder")
        if d.source == "insightface":
            for name, key in zip(d.files(), ("data.train", "data.pairs")):
                if not (root / name).exists():
                    raise ToolchainError(f"{key}: {root / name} does not exist")
    model = recipe.export.model
    if model and model not in list_models() and not Path(model).is_file():
        raise ToolchainError(f"export.model: {model} is neither a known model ({', '.join(list_models())}) "
                             "nor a checkpoint file")
    check_int8_module_names(recipe)


def default_stages(recipe: Recipe) -> list[Stage]:
    """The stages of a recipe's route, in order."""
    check_recipe_inputs(recipe)
    data = Stage("data", _stage_data, title="data", workdir="data", external=_folder_inputs, version=2,
                 config=lambda ctx: ctx.recipe.data.model_dump(mode="json"))
    stages = [data]
    if recipe.train.backbone is not None:
        stages.append(Stage("train_backbone", _stage_train_backbone, title="train backbone (h_bb)",
                            after=("data",), external=_backbone_inputs, workdir="train/backbone",
                            config=lambda ctx: _train_config(ctx.recipe.train.backbone)))
    if recipe.data.source == "folder":
        if recipe.train.backbone is None:
            raise ToolchainError("data.source 'folder' builds its pairs with the trained backbone: "
                                 "the recipe needs train.backbone")
        stages.append(Stage("pairs", _stage_pairs, title="verification pairs (held-out identities)",
                            after=("data", "train_backbone"), workdir="pairs",
                            config=lambda ctx: ctx.recipe.data.model_dump(mode="json")))
    if recipe.kind == "verifier":
        stages += [
            Stage("train_hypernet", _stage_train_hypernet, title="train hypernetwork (h_gen)",
                  after=("data", "train_backbone"), external=_external_data, workdir="train/hypernet",
                  config=lambda ctx: _train_config(ctx.recipe.train.hypernet)),
            Stage("enroll", _stage_enroll, title="enroll users", version=3,
                  after=("data", *(("pairs",) if recipe.data.source == "folder" else ()), "train_hypernet"),
                  external=_external_data, workdir="users",
                  config=lambda ctx: {"enroll": ctx.recipe.enroll.model_dump(mode="json"),
                                      "negatives": ctx.recipe.parity.max_negatives}),
        ]
    trained = tuple(s.name for s in stages[1:])
    stages += [
        Stage("evaluate", _stage_evaluate, title="evaluate on the pairs", after=("data", *trained), version=2,
              external=_external_data, config=lambda ctx: ctx.recipe.evaluate.model_dump(mode="json")),
        # version 5: bias correction and QAT fold a Linear -> BatchNorm1d head as PT2E does.
        # version 6: bias correction reaches onnx2tf's .tflite (toolchain.export.tflite_bias_correction).
        # version 7: and its ops with a fused ReLU or ReLU6, where the float output is clear of the clamp.
        # version 8: and where it is clear of the int8 output's range; the record says what it did.
        Stage("export", _stage_export, title="quantize + export", after=("data", *trained), version=8,
              external=_external_data, workdir="export",
              config=lambda ctx: {"export": ctx.recipe.export.model_dump(mode="json"), "seed": ctx.recipe.seed,
                                  **_fallback_targets_key(ctx)}),
        Stage("profile", _stage_profile, title="profile + budgets", after=("export", *trained),
              config=lambda ctx: {"budgets": ctx.recipe.budgets.model_dump(mode="json"),
                                  "zoo": ctx.recipe.report.compare_backbones}),
        # version 2: rows gain the score's shift and noise against float.
        # version 3: and the flips that noise predicts, the noise budget (toolchain.evaluate.flips), and
        # an embedding model's accuracy at the float model's fold thresholds (refit_accuracy: its own).
        Stage("parity", _stage_parity, title="parity in the runtimes", after=("data", "export", *trained),
              external=_external_data, workdir="parity", version=3,
              config=lambda ctx: ctx.recipe.parity.model_dump(mode="json")),
    ]
    return stages
