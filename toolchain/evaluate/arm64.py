"""x86 against ARM: each `.tflite` run on XNNPACK's x86 kernels (here) and on its aarch64 kernels
(emulated, toolchain.runtime.arm64), both against the float model.

Per artifact, on a sample of the evaluation set (emulation is slow):
- `max_step_diff`: the largest difference between the two architectures' raw int8 outputs, in
  quantisation steps (0: the same bytes); `identical_outputs`: how many outputs match exactly;
- decision agreement ARM vs x86, ARM vs float and x86 vs float, with the decisions made as in
  toolchain.evaluate.parity (a verifier's logit against its enrollment threshold; a backbone's
  pair cosine against the float model's best threshold on the sample);
- accuracy on ARM, on x86 and in float.
Targets (`check_arm`): a verifier's decisions identical on both architectures; a backbone's ARM
decisions within the parity bounds of the float model, as on x86.
`.pte` files get a row that says why they were not run (ExecuTorch is not in the environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from toolchain.errors import CheckFailed, ToolchainError
from toolchain.evaluate.parity import (ParityBounds, ProbeSet, _flip, _l2, _metrics, _reference_source, _scores,
                                       load_eval_set)

PTE_SKIPPED = ("not run: ExecuTorch is not in the ARM environment (its Python runtime imports torch, and "
               "PyPI's aarch64 torch wheel is the CUDA build)")


def sample_eval_set(data, size: int, seed: int = 0):
    """A seeded sample: `size` probes (every positive that fits in half, then negatives) or pairs."""
    rng = np.random.default_rng(seed)
    if isinstance(data, ProbeSet):
        pos, neg = np.flatnonzero(data.issame), np.flatnonzero(~data.issame)
        pos = pos[:max(1, size // 2)] if len(pos) else pos
        neg = np.sort(rng.choice(neg, min(len(neg), size - len(pos)), replace=False))
        idx = np.concatenate([pos, neg])
        return ProbeSet(data.images[idx], data.issame[idx], data.name)
    from toolchain.data.pairs import VerificationPairs

    idx = np.sort(rng.choice(len(data.issame), min(size, len(data.issame)), replace=False))
    return VerificationPairs(data.images_a[idx], data.images_b[idx], data.issame[idx], data.name)


def _images(data) -> np.ndarray:
    """Every image the artifact must see, in the order `_decide` reads them back."""
    if isinstance(data, ProbeSet):
        return data.images
    return np.concatenate([data.images_a, _flip(data.images_a), data.images_b, _flip(data.images_b)])


def _pair_scores(out: np.ndarray, n: int) -> np.ndarray:
    ea, eb = out[:n] + out[n:2 * n], out[2 * n:3 * n] + out[3 * n:]
    return np.sum(_l2(ea) * _l2(eb), axis=1).astype(np.float64)


def arm_parity(artifacts: Sequence, eval_set, reference=None, bounds=None, *, sample: int = 200, seed: int = 0,
               env=None, cpu: str | None = None) -> list[dict]:
    """One row per artifact (see the module docstring)."""
    from toolchain.runtime import load_runner
    from toolchain.runtime.arm64 import Arm64LiteRTRunner, find_arm_env
    from toolchain.runtime.litert_runner import LiteRTRunner

    bounds = ParityBounds.from_any(bounds)
    env = env or find_arm_env()
    data = sample_eval_set(load_eval_set(eval_set), sample, seed)
    is_probe = isinstance(data, ProbeSet)
    y = data.issame
    rows, refs = [], {}
    for art in map(Path, artifacts):
        row = {"artifact": str(art), "file": art.name, "arch": "arm64", "cpu": cpu or "max", "num": int(len(y))}
        if art.suffix.lower() != ".tflite":
            rows.append({**row, "skipped": PTE_SKIPPED if art.suffix.lower() == ".pte" else "not a .tflite"})
            continue
        x86, arm = LiteRTRunner(art), Arm64LiteRTRunner(art, env, cpu=cpu)
        kind = "verifier" if x86.output == "logit" else "backbone"
        if is_probe != (kind == "verifier"):
            raise ToolchainError(f"{art.name}: a {kind} needs " + ("a probe set (.npz)" if kind == "verifier"
                                                                     else "verification pairs"))
        src = _reference_source(art, reference)
        key = str(Path(src).resolve()) if isinstance(src, (str, Path)) else id(src)
        if key not in refs:
            ref = src if hasattr(src, "run") else load_runner(src)
            refs[key] = (ref, _scores(ref, data)["scores"])
        ref, float_scores = refs[key]
        images = _images(data)
        raw_x86, raw_arm = x86.raw(images), arm.raw(images)
        if raw_x86.shape != raw_arm.shape:
            raise ToolchainError(f"{art.name}: output shapes differ between x86 {raw_x86.shape} and ARM {raw_arm.shape}")
        steps = np.abs(raw_x86.astype(np.int64) - raw_arm.astype(np.int64)) if raw_x86.dtype.kind in "iu" else None
        out_x86 = x86.dequantize(raw_x86).reshape(len(images), -1)
        out_arm = x86.dequantize(raw_arm).reshape(len(images), -1)
        if kind == "verifier":
            thr = x86.threshold if x86.threshold is not None else ref.threshold
            s_x86, s_arm = out_x86[:, 0].astype(np.float64), out_arm[:, 0].astype(np.float64)
            d_x86, d_arm, d_flt = s_x86 >= thr, s_arm >= thr, float_scores >= thr
            accuracy = lambda d, s: float(np.mean(d == y) * 100)  # noqa: E731
        else:
            fm = _metrics(float_scores, y)
            if fm is None:
                raise ToolchainError("arm parity: the sample needs matched and mismatched pairs (>= 10)")
            thr = fm["threshold"]
            s_x86, s_arm = _pair_scores(out_x86, len(y)), _pair_scores(out_arm, len(y))
            d_x86, d_arm, d_flt = s_x86 > thr, s_arm > thr, float_scores > thr
            accuracy = lambda d, s: float((_metrics(s, y) or {"accuracy": np.mean(d == y)})["accuracy"] * 100)  # noqa: E731
        row.update({
            "kind": kind, "precision": x86.metadata.get("precision"), "threshold": float(thr),
            "outputs": int(len(images)),
            "identical_outputs": int(np.sum(np.all(raw_x86.reshape(len(images), -1) == raw_arm.reshape(len(images), -1), axis=1))),
            "max_step_diff": int(steps.max()) if steps is not None else None,
            "max_abs_output_diff": float(np.abs(out_x86 - out_arm).max()),
            "agreement_arm_x86": float(np.mean(d_arm == d_x86) * 100),
            "agreement_arm_float": float(np.mean(d_arm == d_flt) * 100),
            "agreement_x86_float": float(np.mean(d_x86 == d_flt) * 100),
            "accuracy_arm": accuracy(d_arm, s_arm), "accuracy_x86": accuracy(d_x86, s_x86),
            "accuracy_float": accuracy(d_flt, float_scores),
            "max_score_gap_arm_float": float(np.abs(s_arm - float_scores).max()),
            "emulated": arm.where,
        })
        row["accuracy_drop_arm"] = row["accuracy_float"] - row["accuracy_arm"]
        reasons = []
        if kind == "verifier" and row["agreement_arm_x86"] < 100:
            reasons.append(f"ARM decisions differ from x86 on {100 - row['agreement_arm_x86']:.2f}% of probes")
        if kind == "backbone":
            if row["agreement_arm_float"] < bounds.min_agreement - 1e-9:
                reasons.append(f"ARM agreement with float {row['agreement_arm_float']:.2f}% < {bounds.min_agreement}%")
            if row["accuracy_drop_arm"] > bounds.max_accuracy_drop + 1e-9:
                reasons.append(f"ARM accuracy drop {row['accuracy_drop_arm']:.2f} > {bounds.max_accuracy_drop} points")
        row["passed"] = not reasons
        row["reason"] = "; ".join(reasons) or None
        rows.append(row)
    return rows


def check_arm(rows: list[dict]) -> None:
    failed = [r for r in rows if r.get("passed") is False]
    if failed:
        raise CheckFailed("ARM parity failed: " + "; ".join(f"{r['file']}: {r['reason']}" for r in failed))
