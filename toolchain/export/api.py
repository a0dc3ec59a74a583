"""`export_model`: one float model in, checked artifacts plus `export_manifest.json` out.

Every artifact is built into a staging folder inside the output folder and moved into place
only when all of them passed their checks; on any failure the staging folder is removed, so
the output folder never holds a partial or unchecked file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from toolchain.errors import CheckFailed, ToolchainError
from toolchain.export.int8_prelu import with_int8_prelu
from toolchain.export.int8_silu import with_int8_silu
from toolchain.export.row_stem import with_row_stem
from toolchain.atomic import atomic_write_bytes, write_json_atomic
from toolchain.export.metadata import backend_versions, build_metadata, template_id, tool_versions
from toolchain.runtime.manifest import MANIFEST_NAME, MANIFEST_SCHEMA, ArtifactRecord, sha256_file

FORMATS = ("executorch", "tflite")
PRECISIONS = ("int8", "fp32")
TFLITE_BACKENDS = ("onnx2tf", "litert-torch")
_EXT = {"executorch": ".pte", "tflite": ".tflite"}
FLOAT_REFERENCE_NAME = "float_model.pt"


def _parse_list(value, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    if not items:
        raise ToolchainError(f"no {what} given (choose from {', '.join(allowed)})")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ToolchainError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def _unknown_source(source: Any) -> ToolchainError:
    from toolchain.models import list_models

    return ToolchainError(f"{source}: neither a file, an enrolled user folder nor a registered model "
                          f"({', '.join(list_models())})")


def check_source(source: str) -> None:
    """Raise the error `resolve_source` would for a name that is neither a path nor a registered
    model, without loading anything (commands that take several models check them all first)."""
    from toolchain.models import list_models

    if not Path(str(source)).exists() and str(source) not in list_models():
        raise _unknown_source(source)


def resolve_source(source: Any, model_kwargs: dict | None = None, seed: int = 0) -> tuple[nn.Module, dict, dict]:
    """(float model in eval mode, loader meta, source record) from a module, name or path."""
    from toolchain.models import build_model, list_models
    from toolchain.models.io import load_model

    if isinstance(source, nn.Module):
        if getattr(source, "spec", None) is None:
            raise ToolchainError("model has no .spec (build it with toolchain.models.build_model)")
        return source.eval(), {"model": source.spec.name, "model_kwargs": dict(model_kwargs or {})}, \
            {"kind": "module", "model": source.spec.name}
    path = Path(str(source))
    if path.exists():
        model, meta = load_model(path)
        rec = {"kind": "user_dir" if path.is_dir() else "checkpoint", "path": str(path.resolve())}
        if path.is_file():
            rec["sha256"] = sha256_file(path)
        return model, meta, rec
    if str(source) in list_models():
        torch.manual_seed(seed)
        model = build_model(str(source), **(model_kwargs or {})).eval()
        return model, {"model": str(source), "model_kwargs": dict(model_kwargs or {})}, \
            {"kind": "registry", "model": str(source), "random_init": True, "seed": seed}
    raise _unknown_source(source)


def _save_float_reference(model: nn.Module, meta: dict, out: Path) -> str | None:
    """Store the float model beside the artifacts (for parity) when it is a registry model."""
    from toolchain.models import build_model
    from toolchain.models.io import save_checkpoint

    try:
        probe = build_model(meta["model"], **meta.get("model_kwargs", {}))
        probe.load_state_dict(model.state_dict())
    except Exception:  # noqa: BLE001 - a custom module: no reloadable reference
        return None
    save_checkpoint(out / FLOAT_REFERENCE_NAME, meta["model"], meta.get("model_kwargs", {}), model.state_dict())
    return FLOAT_REFERENCE_NAME


def _check_model_input(model: nn.Module, spec) -> torch.Tensor:
    c, h, w = spec.input_size
    example = torch.zeros(1, c, h, w)
    try:
        with torch.no_grad():
            y = model(example)
    except Exception as exc:  # noqa: BLE001 - wrong input size, broken model
        raise ToolchainError(f"model {spec.name!r} does not run on its declared input (1, {c}, {h}, {w}): "
                             f"{str(exc).splitlines()[0]}") from exc
    if y.reshape(1, -1).shape[1] != spec.output_dim:
        raise ToolchainError(f"model {spec.name!r} returns {tuple(y.shape)}, its spec says output_dim "
                             f"{spec.output_dim}")
    return torch.randn(1, c, h, w)


def _exact_input_view(model: nn.Module) -> tuple[nn.Module, Any]:
    """The model every artifact is made from: where the first layer can absorb it, the input
    normalisation becomes (p - 128)/128 so int8 inputs are exact (toolchain.quantize.exact_input)."""
    from toolchain.quantize.exact_input import fold_input_normalisation

    folded = fold_input_normalisation(model)
    return (model, model.spec) if folded is None else (folded.eval(), folded.spec)


def _exact_input(spec) -> bool:
    from toolchain.quantize.exact_input import EXACT_MEAN, EXACT_STD

    return tuple(spec.mean) == (EXACT_MEAN,) * 3 and tuple(spec.std) == (EXACT_STD,) * 3


def _check_exact_tflite_input(input_quant: dict | None, model_name: str) -> None:
    from toolchain.quantize.exact_input import INPUT_SCALE, INPUT_ZERO_POINT

    q = input_quant or {}
    if abs(float(q.get("scale", 0)) - INPUT_SCALE) > 1e-9 or int(q.get("zero_point", -1)) != INPUT_ZERO_POINT:
        raise CheckFailed(f"{model_name} int8 .tflite: input quantisation {q} is not the exact pixel grid "
                          f"(scale 1/128, zero-point 0) the calibration was anchored to")


def _prepare_calibration(calibration_images, spec, size: int, seed: int) -> np.ndarray:
    from toolchain.quantize.calibration import load_images
    from toolchain.runtime.preprocess import check_images

    if calibration_images is None:
        raise ToolchainError("int8 export needs calibration images (--calibration PATH); none given")
    hw = spec.input_size[1:]
    if isinstance(calibration_images, (str, Path)):
        images = load_images(calibration_images, hw)
    else:
        images = check_images(calibration_images, hw, what="calibration images")
    if size and len(images) > size:
        rng = np.random.default_rng(seed)
        images = images[np.sort(rng.choice(len(images), size, replace=False))]
    return np.ascontiguousarray(images)


def _head_quantizer(model: nn.Module, spec, calib: np.ndarray, threshold: float | None):
    """For a verifier whose per-user tensors are its head: `compute(feature_scale)` -> its int8
    head (toolchain.quantize.head), over the trunk features of the calibration images. The full
    export and the fleet path both write this, so their files are byte-identical. None for other
    models (and for verifiers with per-user trunk tensors: the converter quantises those)."""
    if spec.output != "logit" or threshold is None or not hasattr(model, "per_user_tensors"):
        return None
    per_user = model.per_user_tensors()
    if not all(n.startswith("head.") for n in per_user):
        return None
    from toolchain.quantize.head import quantize_head

    features = trunk_features(model, calib, spec)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return lambda feature_scale: quantize_head(state, per_user, features, feature_scale, threshold)


def trunk_features(model: nn.Module, images: np.ndarray, spec, batch: int = 256) -> np.ndarray:
    """The shared trunk's pooled float features (N, F) of uint8 images, as the head reads them."""
    from toolchain.runtime.preprocess import model_input

    with torch.no_grad():
        return np.concatenate([model.features(torch.from_numpy(model_input(images[i:i + batch], spec.mean,
                                                                           spec.std))).numpy()
                               for i in range(0, len(images), batch)]).astype(np.float32)


def export_model(source: Any, out_dir: str | Path, formats: Sequence[str] | str = FORMATS,
                 precisions: Sequence[str] | str = PRECISIONS, calibration_images=None, *,
                 calibration_size: int = 128, tflite_backend: str = "onnx2tf",
                 threshold: float | None = None, require_full_delegation: bool | None = None,
                 model_kwargs: dict | None = None, seed: int = 0, progress: bool = True,
                 name: str | None = None, int8=None, identity_images=None,
                 fallback_targets: dict | None = None) -> list[ArtifactRecord]:
    """Export `source` (nn.Module with .spec, checkpoint, user folder or registry name) to
    `out_dir`, one file per format x precision, and write `export_manifest.json` there.

    require_full_delegation: None means True for the `verifier` (one XNNPACK partition, nothing
    outside, and no op LiteRT's XNNPACK refuses in int8) and False for zoo models, whose
    report then lists what stays outside.
    int8: calibration method, bias correction, QAT and the fallback
    (toolchain.quantize.int8_options.Int8Options or a dict; None: the defaults); a dict's
    `executorch` / `tflite` keys override it for that format's file. Each int8
    artifact records the method it was made with; QAT and the fallback (toolchain.quantize.recovery)
    train on / measure with `identity_images` (uint8 NHWC; default: the calibration images), the
    fallback towards `fallback_targets` ({"min_cosine_mean", "min_cosine_min"}, and optionally the
    agreement target's "score_threshold" and "max_score_noise",
    toolchain.evaluate.flips.agreement_target). What they did is in the manifest's
    `int8_recovery` (the `.tflite`'s under its `tflite` key when its options differ).
    """
    from toolchain.quantize.int8_options import Int8Options

    formats = _parse_list(formats, FORMATS, "format")
    precisions = _parse_list(precisions, PRECISIONS, "precision")
    options = {f: Int8Options.from_any(int8, f) for f in FORMATS}
    if tflite_backend not in TFLITE_BACKENDS:
        raise ToolchainError(f"unknown TFLite backend {tflite_backend!r} ({', '.join(TFLITE_BACKENDS)})")
    model, meta, source_rec = resolve_source(source, model_kwargs, seed)
    spec = model.spec
    model_name = name or spec.name
    if threshold is None:
        threshold = meta.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ToolchainError(f"{model_name}: decision threshold {threshold!r} is not a finite number "
                             "(enrollment.json's `threshold` or --threshold)")
    if spec.output == "logit" and threshold is None:
        raise ToolchainError(f"{model_name}: a verifier needs a decision threshold (enrollment.json or --threshold)")
    if require_full_delegation is None:
        require_full_delegation = spec.name == "verifier"
    example = _check_model_input(model, spec)
    float_model = model  # the reference kept beside the artifacts
    model, spec = _exact_input_view(model)
    calib = _prepare_calibration(calibration_images, spec, calibration_size, seed) if "int8" in precisions else None
    # One int8 graph per distinct set of options: the two formats share it unless the recipe
    # gives one of them its own settings.
    prepared: dict[Int8Options, _Int8Graph] = {}
    versions = tool_versions()

    def all_int8_pte_bytes(int8_model: nn.Module, int8_options, calibration: np.ndarray) -> int:
        # The .pte's fallback keeps its file within the size budget from this base (quantize.recovery).
        opts = dataclasses.replace(int8_options, float_layers=(), fallback=False)
        return len(_lower_pte(int8_model, spec, model_name, example, "int8", calibration, threshold, source_rec,
                              versions, False, int8=opts)[0])

    for f in formats:
        if options[f] not in prepared:
            # The fallback in torch's graph chooses the .pte's float layers; the .tflite's runs in
            # LiteRT when the file is converted (toolchain.export.tflite_fallback).
            torch_fallback = "executorch" in formats and options[f] == options["executorch"]
            prepared[options[f]] = _int8_graph(model, spec, calib, identity_images, options[f], fallback_targets,
                                               torch_fallback, seed, progress, all_int8_pte_bytes)
    graphs = {f: prepared[options[f]] for f in formats}
    first = graphs[formats[0]]
    recovery = dict(first.recovery)
    if "tflite" in graphs and graphs["tflite"] is not first:
        recovery["tflite"] = {"int8": graphs["tflite"].options.to_dict(), **graphs["tflite"].recovery}
    user = meta.get("user") if spec.output == "logit" else None

    def head_quantizer(g: _Int8Graph):
        return _head_quantizer(model, spec, g.calibration, threshold) if g.calibration is not None else None

    def template(fmt: str, precision: str, backend: str) -> str | None:
        if user is None:
            return None
        calib_sha = graphs[fmt].calibration_sha256
        return template_id(hypernet_sha256=meta.get("hypernet_sha256"), calibration_sha256=calib_sha, fmt=fmt,
                           precision=precision, versions=backend_versions(versions, backend),
                           model_kwargs=meta.get("model_kwargs", {}), int8=graphs[fmt].options)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=out))
    records: list[ArtifactRecord] = []
    try:
        jobs = [(f, p) for f in formats for p in precisions]
        with _progress(progress, len(jobs)) as advance:
            if "executorch" in formats:
                g = graphs["executorch"]
                compute_head = head_quantizer(g)
                for p in precisions:
                    records.append(_export_pte(g.model if p == "int8" else model, spec, model_name, example, p,
                                               g.calibration, threshold, source_rec, versions,
                                               require_full_delegation, staging, compute_head, user,
                                               template("executorch", p, "xnnpack"), g.options))
                    advance(f"executorch {p}")
            if "tflite" in formats:
                g = graphs["tflite"]
                compute_head = head_quantizer(g)
                # LiteRT's XNNPACK refuses an int8 PRELU: the .tflite computes each PReLU on ops it
                # runs in int8 (toolchain.export.int8_prelu); the .pte keeps XNNPACK's int8 PReLU.
                tflite_int8_model = with_int8_prelu(g.model) or g.model
                # ... and a patchify stem in the layout its int8 kernels run fastest
                # (toolchain.export.row_stem). The .pte keeps the plain stem: its NHWC input
                # (toolchain.export.nhwc_input) would need transposes around the row reshape.
                tflite_int8_model = with_row_stem(tflite_int8_model, spec.input_size[2]) or tflite_int8_model
                plan = _tflite_float_plan(model, spec, g, tflite_int8_model, example, fallback_targets, progress,
                                          graphs.get("executorch")) \
                    if "int8" in precisions and tflite_backend == "onnx2tf" else None
                records += _export_tflite(model, tflite_int8_model, spec, model_name, example, precisions,
                                          g.calibration, threshold, source_rec, versions, require_full_delegation,
                                          staging, tflite_backend, compute_head, user,
                                          {p: template("tflite", p, tflite_backend) for p in precisions}, g.options,
                                          float_plan=plan,
                                          full_range_ops=_full_range_ops(tflite_int8_model, example, g.options),
                                          per_user_ops=_per_user_ops(tflite_int8_model, example, g.options))
                if plan is not None and plan.report:
                    recovery["tflite_fallback"] = plan.report
                advance("tflite " + ",".join(precisions))
        g = graphs.get("executorch")
        if g is not None and g.options.float_layers and "int8" in precisions:
            # Float layers chosen by the fallback, or named in export.int8.float_layers.
            kept = recovery.setdefault("fallback", {"float_layers": list(g.options.float_layers), "given": True})
            kept["latency"] = _fallback_latency(
                next(r for r in records if r.format == "executorch" and r.precision == "int8"),
                lambda: _export_pte(g.model, spec, model_name, example, "int8", g.calibration, threshold,
                                    source_rec, versions, require_full_delegation, staging, None, user, None,
                                    dataclasses.replace(g.options, float_layers=()), file_name=".all_int8.pte"),
                staging)
        reference = _save_float_reference(float_model, meta, staging) if source_rec["kind"] in ("module", "registry") \
            else source_rec.get("path")
        # All artifacts passed: move them into place, then record them.
        for f in staging.iterdir():
            if not f.name.startswith("."):
                f.replace(out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for r in records:
        r.path = str((out / r.file).resolve())
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "model": model_name,
        "spec": spec.to_dict(),
        "model_kwargs": meta.get("model_kwargs", {}),
        "source": source_rec,
        "reference": reference,
        "threshold": threshold,
        "calibration": None if first.calibration is None else {"images": int(len(first.calibration)),
                                                                "sha256": first.calibration_sha256},
        "int8": first.options.to_dict() if calib is not None else None,
        "int8_recovery": recovery or None,
        "tool_versions": versions,
        "artifacts": _merge_previous(out, source_rec, [r.to_dict() for r in records]),
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return records


@dataclasses.dataclass
class _Int8Graph:
    """What one set of int8 options makes of the float model before a runtime quantises it."""
    model: nn.Module  # the model to quantise (rewrites, equalization, QAT applied)
    options: Any  # Int8Options, with the fallback's float layers filled in
    calibration: np.ndarray | None  # the calibration images left after outlier screening
    recovery: dict  # what equalization, screening, QAT and the fallback did
    measure: np.ndarray | None = None  # the images the fallback measures on (uint8 NHWC)

    @property
    def calibration_sha256(self) -> str | None:
        return None if self.calibration is None else hashlib.sha256(self.calibration.tobytes()).hexdigest()


def _int8_graph(model: nn.Module, spec, calib, identity_images, int8, fallback_targets, torch_fallback: bool,
                seed: int, progress: bool, all_int8_pte_bytes=None) -> _Int8Graph:
    """`all_int8_pte_bytes(int8 model, options, calibration)`: the .pte's size with every layer
    int8, which the .pte's fallback keeps within the size budget from."""
    recovery: dict = {}
    if calib is not None and int8.outlier_factor is not None:  # toolchain.quantize.outliers
        from toolchain.quantize.outliers import screen_outliers

        calib, recovery["calibration_outliers"] = screen_outliers(model, calib, spec.mean, spec.std,
                                                                  int8.outlier_factor)
    int8_model = model
    if calib is not None and int8.equalize:  # exact in float (toolchain.quantize.equalize)
        from toolchain.quantize.equalize import equalize_ranges

        int8_model, recovery["equalize"] = equalize_ranges(model, calib, spec.mean, spec.std)
    # int8 artifacts compute every SiLU as x * sigmoid(x), which ExecuTorch's partition then runs
    # in int8 too.
    int8_model = with_int8_silu(int8_model) or int8_model
    if calib is not None:
        from toolchain.quantize.recovery import measuring_images, recover_int8
        from toolchain.runtime.preprocess import check_images

        identity = None if identity_images is None else check_images(identity_images, spec.input_size[1:],
                                                                      what="identity images")
        wanted = int8
        if not torch_fallback:
            int8 = dataclasses.replace(int8, fallback=False)
        budget = (fallback_targets or {}).get("max_int8_bytes")
        pte_size = None if budget is None or all_int8_pte_bytes is None or not torch_fallback else \
            (int(budget) - _PTE_SIZE_ALLOWANCE, lambda m, opts: all_int8_pte_bytes(m, opts, calib))
        int8_model, int8, recovered = recover_int8(model, int8_model, calib, identity, spec.mean, spec.std, int8,
                                                  targets=fallback_targets, embedding=spec.output == "embedding",
                                                  seed=seed, progress=progress, pte_size=pte_size)
        recovery |= recovered
        int8 = dataclasses.replace(int8, fallback=wanted.fallback)
        measure = measuring_images(calib if identity is None or len(identity) < 2 else identity, seed)
        return _Int8Graph(int8_model, int8, calib, recovery, measure)
    return _Int8Graph(int8_model, int8, calib, recovery)


# Room left under the size budget for what the written file adds to the converter's bytes: its
# embedded metadata, less the counters stripped from tensor names (MobileFaceNet's mixed .tflite:
# 1,775,960 B from the converter, 1,775,832 B written).
_METADATA_ALLOWANCE = 16_384
# Room left under the size budget for the error of the .pte's predicted size (its all-int8 file
# plus 3 bytes a float weight, toolchain.quantize.recovery). Float blocks also drop their int8
# scales, so the prediction runs high: SeesawFaceNet's 4 float blocks, 1,909,728 B predicted,
# 1,883,712 B written (docs/int8-backbones.md).
_PTE_SIZE_ALLOWANCE = 16_384


def _full_range_ops(tflite_model, example, opts: Int8Options):
    """For onnx2tf's .tflite: the ops of `export.int8.full_range_layers` in a calibrated file."""
    if not opts.full_range_layers:
        return None
    from toolchain.export.tflite_fallback import unit_tensors

    return lambda calibrated: unit_tensors(calibrated, tflite_model, example, opts.full_range_layers)


def _per_user_ops(tflite_model, example, opts: Int8Options):
    """For onnx2tf's .tflite with bias correction: the ops of a verifier's per-user layers in a
    calibrated file, whose biases keep their values (the .pte's correction skips them too)."""
    if not opts.bias_correction or not hasattr(tflite_model, "per_user_tensors"):
        return None
    layers = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in tflite_model.per_user_tensors() if n.endswith(".bias")))
    if not layers:
        return None
    from toolchain.export.tflite_fallback import unit_tensors

    return lambda calibrated: unit_tensors(calibrated, tflite_model, example, layers)


def _tflite_float_plan(model, spec, g: _Int8Graph, tflite_model, example, targets: dict | None, progress: bool,
                       pte: _Int8Graph | None = None):
    """What the int8 .tflite keeps in float (toolchain.export.tflite_fallback), or None: the
    layers the recipe names, or with the fallback on the units it chooses in LiteRT, on the
    images the .pte's fallback measures on, within the size budget. `pte`: the .pte's graph,
    whose float units the .tflite's fallback also judges when its own choice misses."""
    from toolchain.export.tflite_fallback import FloatPlan
    from toolchain.quantize.recovery import fallback_targets_report
    from toolchain.quantize.sensitivity import mirrored_embeddings
    from toolchain.runtime.preprocess import normalise

    opts = g.options
    if g.calibration is None or spec.output != "embedding" or not (opts.fallback or opts.float_layers):
        return None
    if not opts.fallback:
        return FloatPlan(tflite_model, example, unit=opts.fallback_unit, given=tuple(opts.float_layers))
    targets = targets or {}
    if targets.get("min_cosine_mean") is None and targets.get("min_cosine_min") is None:
        raise ToolchainError("export.int8.fallback needs a target: parity.min_embedding_cosine_mean or "
                             "parity.min_embedding_cosine_min")
    views = tuple(normalise(np.ascontiguousarray(v), spec.mean, spec.std) for v in (g.measure, g.measure[:, :, ::-1]))
    budget = targets.get("max_int8_bytes")
    return FloatPlan(tflite_model, example, unit=opts.fallback_unit, fallback=True, views=views,
                     reference=mirrored_embeddings(model.eval(), g.measure, 16, spec.mean, spec.std),
                     targets=fallback_targets_report(targets),
                     max_units=opts.max_float_layers,
                     max_bytes=None if budget is None else int(budget) - _METADATA_ALLOWANCE, progress=progress,
                     also_try=tuple(pte.options.float_layers) if pte is not None and
                     pte.options.fallback_unit == opts.fallback_unit else ())


def _fallback_latency(kept: ArtifactRecord, all_int8, staging: Path) -> dict:
    """What keeping layers in float costs: in-runtime latency of the exported .pte against the
    same model with every layer int8 (exported aside, measured, deleted)."""
    from toolchain.runtime import load_runner

    full = all_int8()
    try:
        ms = {"with_float_layers": load_runner(staging / kept.file).runtime_latency(repeats=30),
              "all_int8": load_runner(staging / full.file).runtime_latency(repeats=30)}
    finally:
        (staging / full.file).unlink(missing_ok=True)
    out = {k: v["runtime_ms"] if v.get("runtime_ms") is not None else v["wall_ms"] for k, v in ms.items()}
    return {**out, "ratio": out["with_float_layers"] / out["all_int8"], "source": ms["all_int8"].get("source")}


def _merge_previous(out: Path, source_rec: dict, new: list[dict]) -> list[dict]:
    """Keep earlier artifacts of the same source that this call did not rewrite."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return new
    try:
        import json

        old = json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - a broken old manifest is replaced
        return new
    if old.get("source") != source_rec:
        return new
    names = {r["file"] for r in new}
    kept = [a for a in old.get("artifacts", []) if a.get("file") not in names and (out / a.get("file", "")).is_file()
            and sha256_file(out / a["file"]) == a.get("sha256")]
    return kept + new


class _progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda what: None
        from rich.progress import Progress

        self._p = Progress(transient=True)
        self._p.__enter__()
        task = self._p.add_task("exporting", total=self.total)
        return lambda what: self._p.update(task, advance=1, description=f"exported {what}")

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)
        return False


def _checks(checks: dict, head_feature_scale: float | None, int8_method: dict | None = None) -> dict:
    """An artifact's checks; an int8 verifier's also say where its per-user head was written from
    (toolchain.quantize.head): the int8 scale of the head's input, which templates share. An int8
    artifact's `int8_method` says how its ranges were calibrated, and by what."""
    if int8_method is not None:
        checks["int8_method"] = int8_method
    if head_feature_scale is not None:
        checks["head_quant"] = {"function": "toolchain.quantize.head.quantize_head",
                                "feature_scale": float(head_feature_scale)}
    return checks


def _record(staging: Path, fname: str, data: bytes, meta: dict, fmt: str, precision: str, backend: str,
            checks: dict, seconds: float) -> ArtifactRecord:
    path = staging / fname
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(data))
    return ArtifactRecord(file=fname, path=str(path), format=fmt, precision=precision, backend=backend,
                          bytes=path.stat().st_size, sha256=sha256_file(path), model=meta["model"],
                          output=meta["output"], input_shape=meta["input"]["shape"],
                          input_layout=meta["input"]["layout"], input_dtype=meta["input"]["dtype"],
                          threshold=meta.get("threshold"), checks=checks, export_seconds=round(seconds, 2))


def _export_pte(model, spec, model_name, example, precision, calib, threshold, source_rec, versions,
                require_full, staging, compute_head=None, user=None, template=None, int8=None,
                file_name: str | None = None) -> ArtifactRecord:
    """One .pte; an int8 one with layers kept in float (the fallback) is named `*_int8_mixed.pte`:
    a file that is not int8 end to end is not called int8."""
    t0 = time.perf_counter()
    data, meta, report = _lower_pte(model, spec, model_name, example, precision, calib, threshold, source_rec,
                                    versions, require_full, compute_head, user, template, int8)
    method = int8.applied(pt2e=True) if precision == "int8" else None
    mixed = precision == "int8" and int8.float_layers
    file_name = file_name or f"{model_name}_{precision}{'_mixed' if mixed else ''}.pte"
    return _record(staging, file_name, data, meta, "executorch", precision, "xnnpack",
                   _checks({"delegation": report.to_dict()}, report.head_feature_scale, method),
                   time.perf_counter() - t0)


def _lower_pte(model, spec, model_name, example, precision, calib, threshold, source_rec, versions, require_full,
               compute_head=None, user=None, template=None, int8=None):
    """(bytes, metadata, delegation report) of one .pte (toolchain.export.executorch)."""
    from toolchain.export.executorch import export_executorch
    from toolchain.quantize.exact_input import INPUT_SCALE, INPUT_ZERO_POINT

    def metadata_fn(internal):
        return build_metadata(model_name=model_name, spec=spec, fmt="executorch", precision=precision,
                              backend="xnnpack", input_shape=list(example.shape), layout="NCHW",
                              input_dtype="float32", input_quant=None, output_quant=None, output_dtype="float32",
                              threshold=threshold, source=source_rec, versions=versions, internal_quant=internal,
                              user=user, template=template)

    pin = (INPUT_SCALE, INPUT_ZERO_POINT) if _exact_input(spec) else None
    return export_executorch(model, example, precision, calib, spec.mean, spec.std, require_full, metadata_fn,
                             input_qparams=pin, output_threshold=threshold if spec.output == "logit" else None,
                             compute_head=compute_head if precision == "int8" else None, int8=int8)


def _export_tflite(model, int8_model, spec, model_name, example, precisions, calib, threshold, source_rec, versions,
                   require_full, staging, backend, compute_head=None, user=None,
                   templates: dict | None = None, int8=None, float_plan=None,
                   full_range_ops=None, per_user_ops=None) -> list[ArtifactRecord]:
    """The .tflite files; an int8 one with units kept in float (`float_plan`,
    toolchain.export.tflite_fallback) is named `*_int8_mixed.tflite`."""
    from toolchain.export.metadata import embed_tflite_metadata
    from toolchain.export.tflite import (
        align_tflite_output, export_tflite_litert_torch, export_tflite_onnx2tf, write_head_quant_tflite,
    )
    from toolchain.export.tflite_check import inspect_tflite

    t0 = time.perf_counter()
    head_feature_scale = None
    conversion: dict = {}  # what the int8 conversion's own steps did (bias correction)
    if backend == "onnx2tf":
        if int8_model is model or "int8" not in precisions:
            blobs = export_tflite_onnx2tf(model, example, precisions, calib, spec.mean, spec.std,
                                          exact_input=_exact_input(spec), int8=int8, float_plan=float_plan,
                                          full_range_ops=full_range_ops, per_user_ops=per_user_ops,
                                          report=conversion)
        else:  # two forms of the model: one conversion each
            blobs = export_tflite_onnx2tf(int8_model, example, ["int8"], calib, spec.mean, spec.std,
                                          exact_input=_exact_input(spec), int8=int8, float_plan=float_plan,
                                          full_range_ops=full_range_ops, per_user_ops=per_user_ops,
                                          report=conversion)
            if "fp32" in precisions:
                blobs.update(export_tflite_onnx2tf(model, example, ["fp32"], None, spec.mean, spec.std))
        if "int8" in blobs and compute_head is not None:
            blobs["int8"], written = write_head_quant_tflite(blobs["int8"], compute_head)
            head_feature_scale = written["feature_scale"]
        elif "int8" in blobs and spec.output == "logit" and threshold is not None:
            blobs["int8"] = align_tflite_output(blobs["int8"], threshold)
    else:
        from toolchain.quantize.exact_input import INPUT_SCALE, INPUT_ZERO_POINT

        pin = (INPUT_SCALE, INPUT_ZERO_POINT) if _exact_input(spec) else None
        out_thr = threshold if spec.output == "logit" else None
        blobs = {p: export_tflite_litert_torch(int8_model if p == "int8" else model, example, p, calib,
                                               spec.mean, spec.std,
                                               input_qparams=pin, output_threshold=out_thr, int8=int8)
                 for p in precisions}
    seconds = (time.perf_counter() - t0) / max(1, len(blobs))
    kept_float = list((float_plan.report if float_plan is not None else {}).get("float_units") or [])
    records = []
    for precision in precisions:
        mixed = precision == "int8" and bool(kept_float)
        report = inspect_tflite(blobs[precision], allow_float_ops=mixed)
        if precision == "int8":
            # A file is named int8 only when the flatbuffer says so; a mixed one only with its float units.
            if report.problems or (report.float_ops and not mixed):
                raise CheckFailed(f"refusing to name the {backend} TFLite file int8: {report.summary()}")
            if _exact_input(spec):
                _check_exact_tflite_input(report.input_quant, model_name)
            if require_full and report.xnnpack_unsupported:
                raise CheckFailed(f"{model_name} int8 .tflite has ops LiteRT's XNNPACK does not run in int8: "
                                  + ", ".join(f"{k} x{v}" for k, v in report.xnnpack_unsupported.items()))
        layout = "NHWC" if report.input_shape[-1] == spec.input_size[0] else "NCHW"
        meta = build_metadata(model_name=model_name, spec=spec, fmt="tflite", precision=precision, backend=backend,
                              input_shape=report.input_shape, layout=layout,
                              input_dtype=report.input_type.lower(), input_quant=report.input_quant,
                              output_quant=report.output_quant, output_dtype=report.output_type.lower(),
                              threshold=threshold, source=source_rec, versions=versions, user=user,
                              template=(templates or {}).get(precision))
        data = embed_tflite_metadata(blobs[precision], meta)
        method = None
        if precision == "int8":
            method = int8.applied(pt2e=backend != "onnx2tf", float_layers=False)  # (the .pte's fallback)
            if mixed:
                method["float_layers"] = kept_float
        records.append(_record(staging, f"{model_name}_{precision}{'_mixed' if mixed else ''}.tflite", data, meta,
                               "tflite", precision,
                               backend, _checks({"tflite": {**report.to_dict(),
                                                            **(conversion if precision == "int8" else {})}},
                                                head_feature_scale if precision == "int8" else None, method), seconds))
    return records
