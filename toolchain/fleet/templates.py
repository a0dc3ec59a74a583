"""Fleet templates: one converted file per (format, precision), and where each user's values go.

A template is built by exporting probe users in full (`toolchain.export.export_model`, the same
call `toolchain export` makes), from verifiers the hypernetwork generates for fixed random
embeddings. Two probes teach the patch plan (toolchain.fleet.patch); a third checks it: its
patched file must equal its full export byte for byte, or no template is made. Templates are
cached under DIR/.templates/<template id>/, keyed by the hypernet's sha256, the calibration set's
sha256, the format, the precision and the tool versions (toolchain.export.metadata.template_id).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolchain.atomic import atomic_write_bytes, write_json_atomic
from toolchain.errors import ToolchainError
from toolchain.fleet.patch import PatchPlan
from toolchain.fleet.values import encoded_values

EXT = {"executorch": ".pte", "tflite": ".tflite"}
PROBES = ("probe-a", "probe-b", "probe-c")


@dataclass
class Template:
    template_id: str
    fmt: str
    precision: str
    data: bytes
    plan: PatchPlan
    values: dict[str, bytes]  # the template (probe-a) user's encoded values
    metadata: dict  # probe-a's embedded metadata: every user's, but for the per-user keys
    feature_scale: float | None  # int8: the scale of the head's input (toolchain.quantize.head)

    @property
    def file_name(self) -> str:
        return f"verifier_{self.precision}{EXT[self.fmt]}"


def probe_users(bundle, out: Path) -> list[Path]:
    """Enrolled folders of verifiers generated from fixed random embeddings (no images needed)."""
    from toolchain.models.io import save_enrollment

    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(PROBES), bundle.hypernet.embedding_dim, generator=gen), dim=1)
    with torch.no_grad():
        theta = bundle.hypernet(emb)
    dirs = []
    for i, name in enumerate(PROBES):
        verifier = bundle.hypernet.build_verifier({k: v[i] for k, v in theta.items()})
        dirs.append(save_enrollment(out / name, verifier, bundle.hypernet.verifier_kwargs, bundle.threshold,
                                    user=name, num_images=0, hypernet=None, hypernet_sha256=bundle.sha256,
                                    backbone=bundle.meta["backbone"]["model"],
                                    threshold_source="held-out identities at hypernet training (max balanced accuracy)"))
    return dirs


def user_metadata(template: Template, user: str, head) -> bytes:
    """The metadata a full export of `user` embeds: the template's, with the per-user keys."""
    from toolchain.export.metadata import serialized_metadata

    meta = json.loads(json.dumps(template.metadata))
    meta["user"] = user
    meta["source"] = {**meta.get("source", {}), "path": user}
    if head is not None:
        scale, zero_point = head.output
        quant = {"scale": float(np.float32(scale)), "zero_point": int(zero_point)}
        if template.fmt == "executorch":
            meta["internal_quantization"]["output"] = {**meta["internal_quantization"]["output"], **quant}
        else:
            meta["output_tensor"]["quantization"] = quant
    return serialized_metadata(meta).encode()


def template_values(template_or_parts, user: str, state: dict, head) -> dict[str, bytes]:
    return encoded_values(template_or_parts.precision, state, head, user_metadata(template_or_parts, user, head))


def build_templates(bundle, calibration: np.ndarray, features: np.ndarray, formats, precisions, cache: Path,
                    progress=None) -> tuple[dict[tuple[str, str], Template], dict]:
    """{(format, precision): Template}, built or read from `cache`; and timings
    {"build_seconds", "full_export_seconds_per_user"} (0 and None when all were cached)."""
    from toolchain.export import export_model
    from toolchain.models.io import load_model
    from toolchain.quantize.head import quantize_head
    from toolchain.runtime.metadata import read_embedded_metadata

    ids = template_ids(bundle, calibration, formats, precisions)
    cached = {}
    for (fmt, p), tid in ids.items():
        found = _read_cached(cache, tid, fmt, p)
        if found is not None:
            cached[(fmt, p)] = found
    wanted = list(ids)
    if all(k in cached for k in wanted):
        return cached, {"build_seconds": 0.0, "full_export_seconds_per_user": None}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toolchain-fleet-probes-") as tmp:
        tmp = Path(tmp)
        dirs = probe_users(bundle, tmp / "users")
        exports, seconds = [], []
        for i, d in enumerate(dirs):
            s0 = time.perf_counter()
            recs = export_model(d, tmp / "out" / d.name, formats, precisions, calibration,
                                calibration_size=len(calibration), progress=False)
            seconds.append(time.perf_counter() - s0)
            exports.append({(r.format, r.precision): r for r in recs})
            if progress:
                progress(f"template probe {i + 1}/{len(dirs)} exported")
        built = {}
        for fmt, p in wanted:
            if (fmt, p) in cached:
                continue
            files, vals, metas = [], [], []
            rec = exports[0][(fmt, p)]
            feature_scale = (rec.checks.get("head_quant") or {}).get("feature_scale") if p == "int8" else None
            if p == "int8" and feature_scale is None:
                raise ToolchainError(f"{fmt} int8: the export did not write the head with "
                                     "toolchain.quantize.head; no template can be made")
            for d, exp in zip(dirs, exports):
                r = exp[(fmt, p)]
                data = Path(r.path).read_bytes()
                model, meta = load_model(d)
                head = None
                if p == "int8":
                    head = quantize_head(model.state_dict(), model.per_user_tensors(), features, feature_scale,
                                         meta["threshold"])
                md = read_embedded_metadata(r.path)
                part = _Parts(fmt, p, md)
                files.append(data)
                vals.append(template_values(part, meta["user"], model.state_dict(), head))
                metas.append(md)
            plan = PatchPlan.learn(files[0], vals[0], files[1], vals[1])
            if plan.apply(files[0], vals[2]) != files[2]:
                raise ToolchainError(f"{fmt} {p}: the patch plan does not reproduce the third probe's full "
                                     "export; no template")
            if metas[0].get("template") != ids[(fmt, p)]:
                raise ToolchainError(f"{fmt} {p}: the probe export names template {metas[0].get('template')}, "
                                     f"expected {ids[(fmt, p)]}")
            t = Template(ids[(fmt, p)], fmt, p, files[0], plan, vals[0], metas[0], feature_scale)
            _write_cached(cache, t)
            built[(fmt, p)] = t
    timings = {"build_seconds": time.perf_counter() - t0,
               "full_export_seconds_per_user": float(np.median(seconds)) if seconds else None}
    return {**cached, **built}, timings


@dataclass
class _Parts:  # what user_metadata needs before a Template exists
    fmt: str
    precision: str
    metadata: dict


BACKEND = {"executorch": "xnnpack", "tflite": "onnx2tf"}


def template_ids(bundle, calibration: np.ndarray, formats, precisions) -> dict[tuple[str, str], str]:
    """The id every (format, precision) template has: the one a full export embeds."""
    import hashlib

    from toolchain.export.metadata import backend_versions, template_id, tool_versions

    if not bundle.sha256:
        raise ToolchainError("the hypernet checkpoint's sha256 is unknown (load it with load_hypernet)")
    calib_sha = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest()
    versions = tool_versions()
    return {(f, p): template_id(hypernet_sha256=bundle.sha256, calibration_sha256=calib_sha, fmt=f, precision=p,
                                versions=backend_versions(versions, BACKEND[f]),
                                model_kwargs=dict(bundle.hypernet.verifier_kwargs))
            for f in formats for p in precisions}


def _write_cached(cache: Path, t: Template) -> None:
    folder = cache / t.template_id
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / t.file_name, lambda tmp: Path(tmp).write_bytes(t.data))
    write_json_atomic(folder / "template.json", {
        "template": t.template_id, "format": t.fmt, "precision": t.precision, "file": t.file_name,
        "feature_scale": t.feature_scale, "metadata": t.metadata, "plan": t.plan.to_dict(),
        "values": {k: v.hex() for k, v in t.values.items()}})


def _read_cached(cache: Path, tid: str, fmt: str, precision: str) -> Template | None:
    path = cache / tid / "template.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        data = (cache / tid / rec["file"]).read_bytes()
        return Template(tid, fmt, precision, data, PatchPlan.from_dict(rec["plan"]),
                        {k: bytes.fromhex(v) for k, v in rec["values"].items()}, rec["metadata"],
                        rec["feature_scale"])
    except (OSError, KeyError, ValueError, ToolchainError):
        return None  # a damaged cache entry is rebuilt
