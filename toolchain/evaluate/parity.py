"""Parity: every exported artifact, run in its own runtime, against the float model in torch.

Two kinds of evaluation set:
- a backbone (embedding model) takes verification pairs (`toolchain.data.load_pairs`): each
  image is embedded together with its horizontal flip (the two embeddings summed, then
  L2-normalised, as in the insightface protocol) and a pair is scored by cosine similarity;
  accuracy is the 10-fold protocol of `verification_metrics`; decisions use the float model's
  best threshold for both models. The artifact's accuracy is scored at the float model's fold
  thresholds (what an app that ships the float model's threshold gets), so its drop is the int8
  error's alone; `refit_accuracy` is its own protocol, each fold's threshold fitted again on its
  scores, which a tiny score change can move to another plateau (docs/int8-backbones.md,
  VarGFaceNet seed 2).
- a verifier (one enrolled user) takes a *probe set*: images with `issame` saying whether each
  shows the enrolled user. The score is the logit; the decision is logit >= the enrollment
  threshold (what the app runs), and accuracy is the accuracy of that decision.
  On disk: `.npz` with `images` (N, H, W, 3) uint8 and `issame` (N,) bool (write_probe_set).

All accuracies and the decision agreement are in percent; the accuracy drop is in points.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolchain.errors import CheckFailed, ToolchainError
from toolchain.evaluate.flips import allowed_flips, expected_flips, noise_budget

PROBE_SCHEMA = "toolchain.probe_set/1"
TAR_FAR = 1e-3  # the false-accept rate the TAR bound is read at
LOWEST_SHOWN = 5  # an embedding model's images furthest from float, listed in each row


@dataclass
class ParityBounds:
    max_accuracy_drop: float = 0.3  # points
    min_agreement: float = 99.5  # percent of decisions equal to the float model's
    # Optional (None: not checked). TAR at FAR=1e-3 lost against the float model, in points;
    # an embedding model's per-image embedding cosine to the float model's, mean and minimum.
    max_tar_drop: float | None = None
    min_cosine_mean: float | None = None
    min_cosine_min: float | None = None

    # The recipe's spellings (toolchain.recipe.ParitySection) of the fields above.
    _RECIPE_KEYS = {"min_decision_agreement": "min_agreement", "min_embedding_cosine_mean": "min_cosine_mean",
                    "min_embedding_cosine_min": "min_cosine_min"}

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_any(cls, bounds) -> "ParityBounds":
        if bounds is None:
            return cls()
        if isinstance(bounds, cls):
            return bounds
        if isinstance(bounds, dict):
            d = {cls._RECIPE_KEYS.get(k, k): v for k, v in bounds.items()}
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: float(v) for k, v in d.items() if k in fields and v is not None})
        raise ToolchainError(f"parity bounds must be a dict or ParityBounds, got {type(bounds).__name__}")


@dataclass
class ProbeSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    issame: np.ndarray  # (N,) bool: the image shows the enrolled user
    name: str = "probe"


def write_probe_set(path: str | Path, images: np.ndarray, issame, **info: Any) -> Path:
    from toolchain.atomic import atomic_write_bytes
    from toolchain.runtime.preprocess import check_images

    images = check_images(images, what="probe images")
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(issame) != len(images):
        raise ToolchainError(f"probe set: {len(images)} images but {len(issame)} labels")
    path = Path(path)
    if path.suffix != ".npz":
        raise ToolchainError(f"{path}: a probe set is written as .npz")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, issame=issame,
                                info=np.array(json.dumps({"schema": PROBE_SCHEMA, **info})))

    atomic_write_bytes(path, write)
    return path


def load_probe_set(path: str | Path) -> ProbeSet:
    from toolchain.runtime.preprocess import check_images

    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: no such probe set")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files or "issame" not in z.files:
                raise ToolchainError(f"{path}: a probe set needs arrays 'images' and 'issame'")
            images, issame = z["images"], z["issame"]
    except ToolchainError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ToolchainError(f"{path}: not a readable .npz ({exc})") from exc
    images = check_images(images, what=f"probe set {path}")
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if len(issame) != len(images):
        raise ToolchainError(f"{path}: {len(images)} images but {len(issame)} labels")
    return ProbeSet(images, issame, name=path.stem)


def load_eval_set(eval_set):
    """A ProbeSet or VerificationPairs from an object or a path (.npz probe set, else pairs)."""
    if isinstance(eval_set, ProbeSet) or hasattr(eval_set, "images_a"):
        return eval_set
    path = Path(eval_set)
    if path.suffix == ".npz":
        return load_probe_set(path)
    from toolchain.data import load_pairs

    return load_pairs(path)


def _flip(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed(runner, images: np.ndarray) -> np.ndarray:
    """Embedding of each image plus its horizontal flip, summed (not normalised)."""
    return runner.run(images) + runner.run(_flip(images))


def unit_embed(runner, images: np.ndarray) -> np.ndarray:
    """`embed`, L2-normalised: what the pair scores and the cosine to float compare."""
    return _l2(embed(runner, images))


def pair_scores(runner, pairs) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The insightface protocol's scores of verification pairs: cosine of the image + mirror
    embeddings, each distinct image embedded once. Returns (scores as float64, embeddings of
    the distinct images, (index_a, index_b) into them)."""
    images, ia, ib = pairs.distinct()
    e = unit_embed(runner, images)
    return np.sum(e[ia] * e[ib], axis=1).astype(np.float64), e, (ia, ib)


def _scores(runner, data) -> dict:
    if isinstance(data, ProbeSet):
        logits = runner.run(data.images)
        return {"scores": logits[:, 0].astype(np.float64)}
    scores, e, index = pair_scores(runner, data)
    return {"scores": scores, "embeddings": e, "index": index}


def _tar_rows(data, s: dict, fs: dict, m: dict | None, fm: dict | None) -> dict:
    """TAR@FAR of the artifact and of float, and what it was measured on: every pair of the
    distinct images when their people are known (metrics.cross_pair_tar), else the listed pairs."""
    from toolchain.evaluate.metrics import cross_pair_tar

    ids = data.distinct_identities(*s["index"], len(s["embeddings"])) if "index" in s else None
    if ids is not None:
        mine, ref = cross_pair_tar(s["embeddings"], ids), cross_pair_tar(fs["embeddings"], ids)
        if mine is not None and ref is not None:
            return {"tar_at_far": mine["tar_at_far"], "float_tar_at_far": ref["tar_at_far"],
                    "far_resolution": ref["far_resolution"],
                    "tar_pairs": {"of": f"every pair of the {len(ids):,} distinct images",
                                  "genuine": ref["genuine"], "impostor": ref["impostor"]}}
    listed = {"of": "the listed pairs", "genuine": int(np.sum(data.issame)), "impostor": int(np.sum(~data.issame))}
    return {"tar_at_far": m["tar_at_far"] if m else None, "float_tar_at_far": fm["tar_at_far"] if fm else None,
            "far_resolution": fm["far_resolution"] if fm else None, "tar_pairs": listed}


def _lowest_images(cos: np.ndarray, pairs, index: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """The LOWEST_SHOWN distinct images whose embeddings are furthest from float's, lowest first:
    the first listed pair each appears in (0-based, side "a" or "b") and its person where the
    pairs' identities are known. The minimum bound hinges on one image; these say which, and
    whether the lowest share a person (on SeesawFaceNet they did: docs/int8-backbones.md)."""
    ia, ib = index
    ids = pairs.distinct_identities(ia, ib, len(cos))
    out = []
    for i in np.argsort(cos, kind="stable")[:LOWEST_SHOWN]:
        pair, side = min([(int(k), "a") for k in np.flatnonzero(ia == i)[:1]] +
                         [(int(k), "b") for k in np.flatnonzero(ib == i)[:1]])
        out.append({"pair": pair, "side": side, "person": None if ids is None else int(ids[i]),
                    "cosine": float(cos[i])})
    return out


def image_place(image: dict) -> str:
    """'pair 12 b, person 261' for an `embedding_cosine_lowest` entry."""
    person = "" if image.get("person") is None else f", person {image['person']}"
    return f"pair {image['pair']} {image['side']}{person}"


def _metrics(scores: np.ndarray, issame: np.ndarray) -> dict | None:
    from toolchain.evaluate.metrics import verification_metrics

    try:
        return verification_metrics(scores, issame, higher_is_same=True)
    except ToolchainError:  # one class only, or fewer pairs than folds
        return None


def _accuracy_at(scores: np.ndarray, issame: np.ndarray, fold_thresholds: list[float]) -> float:
    """Percent accuracy of `scores` over the protocol's folds, each at the given fold's threshold."""
    from toolchain.evaluate.metrics import fold_indices

    folds, _ = fold_indices(issame)  # the folds verification_metrics used
    return float(np.mean([np.mean((scores[k] > t) == issame[k]) for k, t in zip(folds, fold_thresholds)]) * 100)


def _reference_source(artifact: Path, reference):
    """What the float reference is: given explicitly, else the source recorded by the export."""
    from toolchain.runtime.manifest import find_manifest_for
    from toolchain.runtime.metadata import read_embedded_metadata

    if reference is not None:
        return reference
    found = find_manifest_for(artifact)
    if found and found[0].get("reference"):
        ref = Path(found[0]["reference"])
        return ref if ref.is_absolute() else artifact.parent / ref
    src = (read_embedded_metadata(artifact).get("source") or {}).get("path")
    if src and Path(src).exists():
        return Path(src)
    raise ToolchainError(f"{artifact}: no float reference recorded (no export_manifest.json beside it); "
                         "pass --reference FLOAT_MODEL")


def run_parity(artifacts: Sequence, eval_set, reference=None, bounds=None, *, repeats: int = 50,
               raise_on_fail: bool = False) -> list[dict]:
    """One row per artifact; see the module docstring. `reference`: a float model (path,
    nn.Module or Runner) used for every artifact, else each artifact's recorded source."""
    from toolchain.runtime import load_runner

    bounds = ParityBounds.from_any(bounds)
    data = load_eval_set(eval_set)
    if len(data.issame) == 0:
        raise ToolchainError("parity: the evaluation set is empty")
    is_probe = isinstance(data, ProbeSet)
    ref_cache: dict = {}
    rows = []
    for art in artifacts:
        art = Path(art)
        runner = load_runner(art)
        src = _reference_source(art, reference)
        key = str(Path(src).resolve()) if isinstance(src, (str, Path)) else id(src)
        if key not in ref_cache:
            ref = src if hasattr(src, "run") else load_runner(src)
            ref_cache[key] = (ref, _scores(ref, data), ref.latency_ms(repeats))
        ref, fs, f_lat = ref_cache[key]
        kind = "verifier" if runner.output == "logit" else "backbone"
        if is_probe != (kind == "verifier"):
            raise ToolchainError(f"{art.name}: a {kind} needs "
                                 + ("a probe set (.npz)" if kind == "verifier" else "verification pairs"))
        s = _scores(runner, data)
        y = data.issame
        row: dict[str, Any] = {"artifact": str(art), "file": art.name, "kind": kind,
                               "format": runner.metadata.get("format"), "precision": runner.metadata.get("precision"),
                               "backend": runner.metadata.get("backend"), "runtime": runner.kind,
                               "reference": getattr(ref, "name", "float"), "num": int(len(y))}
        a, f = s["scores"], fs["scores"]
        m, fm = _metrics(a, y), _metrics(f, y)
        if kind == "verifier":
            thr = runner.threshold if runner.threshold is not None else ref.threshold
            if thr is None:
                raise ToolchainError(f"{art.name}: no decision threshold in its metadata or the reference")
            dec, fdec = a >= thr, f >= thr
            row["threshold"] = float(thr)
            row["accuracy"] = float(np.mean(dec == y) * 100)
            row["float_accuracy"] = float(np.mean(fdec == y) * 100)
        else:
            if fm is None:
                raise ToolchainError("parity: backbone pairs need matched and mismatched pairs (>= 10)")
            thr = fm["threshold"]
            dec, fdec = a > thr, f > thr
            row["threshold"] = float(thr)
            row["accuracy"] = _accuracy_at(a, y, fm["fold_thresholds"])
            row["refit_accuracy"] = float(m["accuracy"] * 100) if m else None
            row["float_accuracy"] = float(fm["accuracy"] * 100)
            cos = np.sum(_l2(s["embeddings"]) * _l2(fs["embeddings"]), axis=1)
            row["embedding_cosine_mean"] = float(cos.mean())
            row["embedding_cosine_min"] = float(cos.min())
            row["embedding_cosine_lowest"] = _lowest_images(cos, data, s["index"])
        row["accuracy_drop"] = row["float_accuracy"] - row["accuracy"]
        row.update(_tar_rows(data, s, fs, m, fm))
        tar, float_tar = row["tar_at_far"], row["float_tar_at_far"]
        row["tar_drop"] = (float_tar["1e-3"] - tar["1e-3"]) * 100 if tar and float_tar else None
        # The listed pairs' own TAR@FAR=1e-3 drop, reported beside (with few impostors it reads
        # the top few impostor scores).
        row["listed_tar_drop"] = (fm["tar_at_far"]["1e-3"] - m["tar_at_far"]["1e-3"]) * 100 if m and fm else None
        row["auc"] = m["auc"] if m else None
        row["float_auc"] = fm["auc"] if fm else None
        row["decision_agreement"] = float(np.mean(dec == fdec) * 100)
        diff = a - f
        gap = np.abs(diff)
        # What moves the decisions: a shift common to every pair (a systematic error, which
        # bias correction can remove) and the per-pair spread around it (rounding noise).
        row["score_shift"] = float(diff.mean())
        row["score_noise"] = float(diff.std())
        # The flips this noise predicts on these float scores, and the noise the bound allows.
        row["flips"] = int(np.sum(dec != fdec))
        row["allowed_flips"] = allowed_flips(len(y), bounds.min_agreement)
        row["expected_flips"] = expected_flips(f, thr, row["score_noise"])
        row["noise_budget"] = noise_budget(f, thr, row["allowed_flips"])
        row["max_abs_gap"] = float(gap.max())
        row["mean_abs_gap"] = float(gap.mean())
        row["gap_of"] = "logit" if kind == "verifier" else "cosine score"
        row["latency_ms"] = runner.latency_ms(repeats)
        row["float_latency_ms"] = float(f_lat)
        reasons = []
        if row["accuracy_drop"] > bounds.max_accuracy_drop + 1e-9:
            reasons.append(f"accuracy drop {row['accuracy_drop']:.3f} > {bounds.max_accuracy_drop} points")
        if row["decision_agreement"] < bounds.min_agreement - 1e-9:
            reasons.append(f"decision agreement {row['decision_agreement']:.2f}% < {bounds.min_agreement}%")
        reasons += _optional_bound_failures(row, bounds)
        row["passed"] = not reasons
        row["reason"] = "; ".join(reasons) or None
        row["bounds"] = bounds.to_dict()
        row["scores"] = [float(v) for v in a]
        row["float_scores"] = [float(v) for v in f]
        row["issame"] = [bool(v) for v in y]
        rows.append(row)
    if raise_on_fail:
        check_parity(rows)
    return rows


def _optional_bound_failures(row: dict, bounds: ParityBounds) -> list[str]:
    """The bounds a recipe may add: TAR@FAR=1e-3 drop, and an embedding model's cosine to float."""
    out = []
    if bounds.max_tar_drop is not None:
        if row["tar_drop"] is None:
            out.append("TAR@FAR=1e-3 not measurable on this set")
        elif row.get("far_resolution") and row["far_resolution"] > TAR_FAR * (1 + 1e-9):
            # Below 1/FAR mismatched pairs, FAR <= 1e-3 means no false accept at all: the threshold
            # is the top impostor's score, and one impostor's int8 noise moves TAR by points.
            out.append(f"TAR@FAR=1e-3 needs at least {round(1 / TAR_FAR):,} impostor pairs; this set has "
                       f"{round(1 / row['far_resolution']):,} (and no pair_identities.json beside it for every "
                       "pair of its images)")
        elif row["tar_drop"] > bounds.max_tar_drop + 1e-9:
            out.append(f"TAR@FAR=1e-3 drop {row['tar_drop']:.2f} > {bounds.max_tar_drop} points")
    for key, limit in (("embedding_cosine_mean", bounds.min_cosine_mean), ("embedding_cosine_min", bounds.min_cosine_min)):
        if limit is not None and key in row and row[key] < limit - 1e-12:
            lowest = row.get("embedding_cosine_lowest") if key == "embedding_cosine_min" else None
            where = f" ({image_place(lowest[0])})" if lowest else ""
            out.append(f"{key.replace('_', ' ')} {row[key]:.5f} < {limit}{where}")
    return out


def check_parity(rows: list[dict]) -> None:
    failed = [r for r in rows if not r["passed"]]
    if failed:
        raise CheckFailed("parity failed: " + "; ".join(f"{r['file']}: {r['reason']}" for r in failed))
