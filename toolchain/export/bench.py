"""`toolchain bench`: export each model int8 and fp32 to both formats, then measure, in one run,
file sizes, single-thread latencies (int8/fp32 ratio per runtime) and int8 parity.

Latencies are measured inside the runtime (`Runner.runtime_latency`: ExecuTorch's ETDump, LiteRT's
invoke() less a one-op model's), in rounds that take the int8 and fp32 files in turn
(`interleaved_latency`); the Python call around them is reported apart. Targets (issue
#12): int8 faster than fp32 on any CPU, and at most 0.6 x fp32 on a CPU with int8 dot products.

Data: the embedded synthetic faces (toolchain.data.SyntheticFaces), so it runs offline. Models
are registry names (random initialisation unless a trained checkpoint or user folder is given
instead of the name): numbers on random weights measure the export, not a trained model's accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_MODELS = ("verifier", "mobilefacenet", "seesawfacenet", "vargfacenet")
DEFAULT_ROUNDS = 5  # int8 and fp32 measured in alternation, so drift in the machine's speed hits both alike
MIN_ROUND_S = 0.1  # a round runs a file at least this long: the 60-µs verifier takes MAX_CALLS
MAX_CALLS = 1000  # per round and file: one ETDump buffer holds every operator event of every call
TARGET_RATIO = 1.0  # int8 / fp32 in-runtime latency, any CPU
TARGET_RATIO_INT8_DOT = 0.6  # on a CPU with int8 dot products (VNNI, AMX, sdot)


def target_ratio(cpu: dict) -> float:
    return TARGET_RATIO_INT8_DOT if cpu.get("int8_dot") else TARGET_RATIO


def recalibrate_batchnorm(model, images: np.ndarray, batch: int = 16):
    """Give a randomly initialised model data-derived BatchNorm statistics.

    Fresh BatchNorm layers (mean 0, var 1) let activations shrink layer after layer; in a deep
    random backbone the embedding ends near 1e-5, below the int8 observers' smallest scale
    (2^-12), and int8 outputs all zeros. A trained model has real statistics; re-estimating
    them on images makes a random model's activations look like a trained one's, so the
    benchmark measures the export rather than an artefact of initialisation.
    """
    import torch
    from torch import nn

    from toolchain.runtime.preprocess import model_input

    spec = model.spec
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            if len(chunk) < 2:
                continue
            model(torch.from_numpy(model_input(chunk, spec.mean, spec.std)))
    return model.eval()


def synthetic_data(n_pairs: int = 100, n_calib: int = 32, seed: int = 0):
    """(calibration for backbones, enrollment, negatives, VerificationPairs, ProbeSet)."""
    from toolchain.data import SyntheticFaces
    from toolchain.data.pairs import VerificationPairs
    from toolchain.evaluate.parity import ProbeSet

    faces = SyntheticFaces(seed=seed)
    half = n_pairs // 2
    ids = np.arange(1000, 1000 + n_pairs, dtype=np.int64)
    # Pairs: matched pairs are two views of one identity; mismatched are two identities.
    a_ids = ids[:n_pairs]
    b_ids = np.concatenate([a_ids[:half], a_ids[half:][::-1]])
    b_ids[half:][b_ids[half:] == a_ids[half:]] += 1
    images_a = faces.render_batch(a_ids, np.zeros(n_pairs, dtype=np.int64))
    images_b = faces.render_batch(b_ids, np.ones(n_pairs, dtype=np.int64))
    issame = np.arange(n_pairs) < half
    # Interleave so each of the 10 folds holds both kinds.
    order = np.argsort(np.arange(n_pairs) % half, kind="stable")
    pairs = VerificationPairs(images_a[order], images_b[order], issame[order], name="synthetic")
    calib = faces.render_batch(np.arange(n_calib) + 5000, np.arange(n_calib) % 5)
    user = 7
    enrollment = faces.render_batch(np.full(4, user), np.arange(4))
    negatives = faces.render_batch(np.arange(n_calib) + 6000, np.zeros(n_calib, dtype=np.int64))
    n_probe = max(20, n_pairs // 2)
    p_ids = np.where(np.arange(n_probe) % 2 == 0, user, 7000 + np.arange(n_probe))
    probe = ProbeSet(faces.render_batch(p_ids, 10 + np.arange(n_probe)), p_ids == user, name="synthetic-probe")
    return calib, enrollment, negatives, pairs, probe


def run_bench(models: Sequence[str] = DEFAULT_MODELS, out_dir: str | Path = "artifacts/bench",
              formats=("executorch", "tflite"), repeats: int = 100, pairs: int = 100,
              calibration_size: int = 32, seed: int = 0, progress: bool = True, on_row=None,
              tflite_backend: str = "onnx2tf", rounds: int = DEFAULT_ROUNDS) -> list[dict]:
    calib_b, enrollment, negatives, pair_set, probe = synthetic_data(pairs, calibration_size, seed)
    from toolchain.errors import ToolchainError

    rows = []
    for name in models:
        try:
            rows.append(_bench_one(name, out_dir, formats, repeats, calibration_size, seed, progress,
                                   calib_b, enrollment, negatives, pair_set, probe, tflite_backend, rounds))
        except ToolchainError as exc:  # one model failing to export is a result, not the end of the run
            rows.append({"model": str(name), "error": str(exc), "artifacts": {}})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _bench_one(name, out_dir, formats, repeats, calibration_size, seed, progress, calib_b, enrollment,
               negatives, pair_set, probe, tflite_backend, rounds) -> dict:
    import torch

    from toolchain.evaluate.parity import run_parity
    from toolchain.export.api import export_model, resolve_source
    from toolchain.quantize.calibration import build_calibration_set
    from toolchain.runtime import load_runner

    model, meta, src = resolve_source(name, seed=seed)
    is_verifier = model.spec.output == "logit"
    if src.get("random_init"):
        recalibrate_batchnorm(model, np.concatenate([calib_b, negatives]))
    threshold = meta.get("threshold")
    if is_verifier:
        calib = build_calibration_set("verifier", enrollment=enrollment, negatives=negatives,
                                      size=calibration_size, seed=seed)
        if threshold is None:
            # A random-init verifier has no enrollment threshold: the float model's median
            # logit on the probe set splits its decisions in half (the hardest case for parity).
            ref = load_runner(model)
            threshold = float(np.median(ref.run(probe.images)[:, 0]))
    else:
        calib = build_calibration_set("backbone", images=calib_b, size=calibration_size, seed=seed)
    out = Path(out_dir) / Path(str(name)).name
    torch.manual_seed(seed)
    records = export_model(model, out, formats, ("int8", "fp32"), calib, threshold=threshold,
                           require_full_delegation=False, progress=progress, seed=seed,
                           tflite_backend=tflite_backend)
    parity = run_parity([r.path for r in records], probe if is_verifier else pair_set,
                        reference=model, repeats=repeats)
    by = {(r.format, r.precision): r for r in records}
    par = {(p["format"], p["precision"]): p for p in parity}
    lat = interleaved_latency({(r.format, r.precision): r.path for r in records}, repeats, rounds)
    row = {"model": str(name), "random_init": src.get("random_init", False),
           "kind": "verifier" if is_verifier else "backbone", "artifacts": {}}
    for fmt in formats:
        i8, f32 = par[(fmt, "int8")], par[(fmt, "fp32")]
        rec8, rec32 = by[(fmt, "int8")], by[(fmt, "fp32")]
        checks = rec8.checks.get("delegation") or {}
        tfl = rec8.checks.get("tflite") or {}
        l8, l32 = lat[(fmt, "int8")], lat[(fmt, "fp32")]
        row["artifacts"][fmt] = {
            "int8_bytes": rec8.bytes, "fp32_bytes": rec32.bytes,
            "int8_ms": l8["runtime_ms"], "fp32_ms": l32["runtime_ms"], "eager_ms": i8["float_latency_ms"],
            "ratio": l8["runtime_ms"] / l32["runtime_ms"],
            "ratio_range": _ratio_range(l8["rounds_ms"], l32["rounds_ms"]),
            "rounds": len(l8["rounds_ms"]), "int8_calls": l8["calls"], "fp32_calls": l32["calls"],
            "int8_wall_ms": l8["wall_ms"], "fp32_wall_ms": l32["wall_ms"],
            "call_overhead_ms": l8["overhead_ms"], "latency_source": l8["source"],
            "int8_accuracy": i8["accuracy"], "float_accuracy": i8["float_accuracy"],
            "accuracy_drop": i8["accuracy_drop"], "decision_agreement": i8["decision_agreement"],
            "cosine_mean": i8.get("embedding_cosine_mean"), "cosine_min": i8.get("embedding_cosine_min"),
            "max_abs_gap": i8["max_abs_gap"], "fp32_max_abs_gap": f32["max_abs_gap"],
            "outside": {**{f"{k} (outside)": v for k, v in (checks.get("ops_outside") or {}).items()},
                        **{f"{k} (float)": v for k, v in (checks.get("float_ops") or {}).items()},
                        **{f"{k} (float in XNNPACK)": v
                           for k, v in (checks.get("xnnpack_float_nodes") or {}).items()},
                        **{f"{k} (not XNNPACK)": v for k, v in (tfl.get("xnnpack_unsupported") or {}).items()}},
            "partitions": checks.get("partitions"), "backend": rec8.backend,
        }
    return row


def interleaved_latency(paths: dict, repeats: int, rounds: int = DEFAULT_ROUNDS) -> dict:
    """Each file's `Runner.runtime_latency`, `rounds` times, the files taken in turn within each
    round (int8, fp32, int8, ...), so that a slow spell of the machine (another tenant, the clock)
    lands on both precisions instead of on one. A round runs each file for at least MIN_ROUND_S
    (at least `repeats` and at most MAX_CALLS calls). Returns, per key, the latency record with
    medians over the rounds, plus `rounds_ms` (each round's in-runtime median, or wall where the
    runner has none) and `calls` (per round)."""
    from toolchain.runtime import load_runner
    from toolchain.runtime.base import latency_record

    runners = {k: load_runner(p) for k, p in paths.items()}
    calls = {k: int(min(MAX_CALLS, max(repeats, MIN_ROUND_S * 1e3 / max(r.latency_ms(5, 2), 1e-6))))
             for k, r in runners.items()}
    measured: dict = {k: [] for k in runners}
    for _ in range(max(1, rounds)):
        for k, r in runners.items():
            measured[k].append(r.runtime_latency(calls[k]))
    out = {}
    for k, recs in measured.items():
        inside = [x["runtime_ms"] for x in recs]
        runtime = None if None in inside else float(np.median(inside))
        out[k] = latency_record(float(np.median([x["wall_ms"] for x in recs])), runtime, recs[0]["source"]) | {
            "rounds_ms": [x["runtime_ms"] if runtime is not None else x["wall_ms"] for x in recs],
            "calls": calls[k]}
    return out


def _ratio_range(int8_ms: list[float], fp32_ms: list[float]) -> list[float]:
    """Lowest and highest int8/fp32 ratio of one round: how far one round's ratio can be trusted."""
    ratios = [a / b for a, b in zip(int8_ms, fp32_ms)]
    return [float(min(ratios)), float(max(ratios))]


def render_table(rows: list[dict], cpu: dict | None = None):
    from rich.table import Table

    from toolchain.environment import cpu_facts

    cpu = cpu or cpu_facts()
    target = target_ratio(cpu)
    t = Table(title="export benchmark (one thread; latency = median ms per image inside the runtime)",
              caption="acc drop, agree %: trained models only (give a checkpoint or user folder)\n"
                      "in-runtime: ExecuTorch ETDump Method::execute; LiteRT invoke() less a one-op model's. "
                      "call us: the Python call around the int8 inference.\n"
                      "int8/fp32: ratio of the medians over rounds, int8 and fp32 measured in turn "
                      "(in brackets: the lowest and highest ratio of one round).\n"
                      f"target: int8/fp32 <= {target:g} on this CPU"
                      + (" (int8 dot products)" if cpu.get("int8_dot") else " (< 1 required)")
                      + ("\nAMX: XNNPACK's AMX int8 kernels ran (LiteRT); --no-amx measures its VNNI ones"
                         if "AMX-INT8" in cpu.get("int8_features", []) and cpu.get("amx") != "denied" else ""))
    for col in ("model", "runtime", "int8 KB", "fp32 KB", "int8 ms", "fp32 ms", "int8/fp32", "target", "call us",
                "eager ms", "acc drop", "agree %", "cos mean", "cos min", "outside / unsupported"):
        t.add_column(col, justify="left" if col in ("model", "runtime", "outside / unsupported") else "right")
    for r in rows:
        if r.get("error"):
            t.add_row(r["model"], "-", *["-"] * 12, f"FAILED: {r['error']}")
            continue
        for fmt, a in r["artifacts"].items():
            cos = "-" if a["cosine_mean"] is None else f"{a['cosine_mean']:.4f}"
            cmin = "-" if a["cosine_min"] is None else f"{a['cosine_min']:.4f}"
            outside = ", ".join(f"{k} x{v}" for k, v in a["outside"].items()) or "-"
            runtime = f"{fmt} ({a['backend']})" if fmt == "tflite" else fmt
            # Random weights score near chance with outputs bunched together: their accuracy and
            # agreement are noise (kept in --json), so the table shows them for trained models only.
            accuracy = ("-", "-") if r["random_init"] else (f"{a['accuracy_drop']:+.2f}",
                                                            f"{a['decision_agreement']:.1f}")
            t.add_row(r["model"] + (" (random init)" if r["random_init"] else ""), runtime,
                      f"{a['int8_bytes'] / 1024:.1f}", f"{a['fp32_bytes'] / 1024:.1f}",
                      f"{a['int8_ms']:.3f}", f"{a['fp32_ms']:.3f}", _ratio_cell(a),
                      _verdict(a["ratio"], target), f"{a['call_overhead_ms'] * 1e3:.1f}", f"{a['eager_ms']:.3f}",
                      *accuracy, cos, cmin, outside)
    return t


def _ratio_cell(a: dict) -> str:
    lo_hi = a.get("ratio_range")
    return f"{a['ratio']:.2f}" + (f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else "")


def _verdict(ratio: float, target: float) -> str:
    strict = target >= TARGET_RATIO  # "faster than fp32": a ratio of exactly 1 is not
    met = ratio < target if strict else ratio <= target
    return "met" if met else "MISSED"
