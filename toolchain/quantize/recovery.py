"""int8 accuracy recovery before the runtimes quantise: QAT, then the accuracy-aware fallback.

`recover_int8` takes the model the int8 files are made from and the recipe's `export.int8`
(toolchain.quantize.int8_options.Int8Options) and returns the model to quantise, the options
with the fallback's float layers filled in, and a report: the QAT losses and cosines
(toolchain.quantize.qat), the per-layer sensitivity table and the fallback's trail
(toolchain.quantize.sensitivity).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn

from toolchain.errors import ToolchainError

# Identity images the fallbacks measure on: the candidates are ranked on 32 of them
# (toolchain.quantize.selection.ranking_indices), each step's choice is judged on all. 128: the
# targets are judged on a lower confidence bound of the mean, which more images narrow.
MEASURING_IMAGES = 128


def _measuring_indices(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(n, min(MEASURING_IMAGES, n), replace=False))


def measuring_images(images: np.ndarray, seed: int) -> np.ndarray:
    """The images the fallback measures on, the `.pte`'s and the `.tflite`'s alike: a seeded draw
    of MEASURING_IMAGES of `images` (the identity images), in their order."""
    return images[_measuring_indices(len(images), seed)]


def qat_images(images: np.ndarray, seed: int) -> np.ndarray:
    """QAT's training images: all but the ones the fallback measures on, while at least as many
    others remain. Judged on images QAT fitted, MobileFaceNet's all-int8 graph measured 0.99913
    against 0.99897 on others (export seed 1), and its files then missed the 0.999 bound."""
    if len(images) < 2 * MEASURING_IMAGES:
        return images
    return np.delete(images, _measuring_indices(len(images), seed), axis=0)


def fallback_targets_report(targets: dict) -> dict:
    """The targets a fallback aimed at, for its report: the cosine bounds, and the agreement
    target when there is one."""
    return {**{k: targets.get(k) for k in ("min_cosine_mean", "min_cosine_min")}, **(agreement_of(targets) or {})}


def agreement_of(targets: dict | None) -> dict | None:
    """The agreement target among the fallback's `targets`, or None when there is none."""
    targets = targets or {}
    if targets.get("max_score_noise") is None or targets.get("score_threshold") is None:
        return None
    return {k: float(targets[k]) for k in ("score_threshold", "max_score_noise")}


# What a layer kept in float adds to the .pte: its weights in float32 instead of int8. (Its
# per-channel scales and the float ops' own overhead are in the size allowance of the caller.)
FLOAT_WEIGHT_BYTES = 3


def float_weight_count(model: nn.Module, units: list[str]) -> int:
    """Weights of the convolutions and linear layers in `units` (modules or blocks, by name):
    what the .pte stores in float32 instead of int8 when they stay float."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and any(name == u or name.startswith(u + ".") for u in units))


def _size_rule(int8_model: nn.Module, int8, pte_size) -> tuple[dict, object, object]:
    """(report, allowed(units) -> bool, predicted(units) -> bytes): the .pte's predicted size is
    its all-int8 file plus FLOAT_WEIGHT_BYTES a float weight; a choice is allowed while it stays
    within the budget."""
    max_bytes, all_int8_bytes = pte_size
    report = {"all_int8_bytes": None, "max_bytes": int(max_bytes), "bytes_per_float_weight": FLOAT_WEIGHT_BYTES}

    def predicted(units: list[str]) -> int:
        if report["all_int8_bytes"] is None:  # one lowering, only once a float unit is tried
            report["all_int8_bytes"] = int(all_int8_bytes(int8_model, int8))
        return report["all_int8_bytes"] + FLOAT_WEIGHT_BYTES * float_weight_count(int8_model, units)

    def allowed(units: list[str]) -> bool:
        return predicted(units) <= max_bytes

    return report, allowed, predicted


def recover_int8(float_model: nn.Module, int8_model: nn.Module, calibration: np.ndarray,
                 identity_images: np.ndarray | None, mean, std, int8, *, targets: dict | None = None,
                 embedding: bool = True, seed: int = 0, progress: bool = True, pte_size=None):
    """-> (model to quantise, Int8Options with float_layers, report dict). `float_model` is the
    reference (float outputs equal `int8_model`'s; the latter carries the export rewrites).
    identity_images: uint8 NHWC, QAT's training images and the fallback's measuring set, held out
    from QAT (None: the calibration images). targets: {"min_cosine_mean", "min_cosine_min"} of the
    fallback, and optionally its agreement target {"score_threshold", "max_score_noise"}.
    pte_size: (max bytes, all_int8_bytes(model, int8 options)) when the .pte has a size budget:
    the fallback then tries no choice whose predicted file would exceed it."""
    report: dict = {}
    if not (int8.qat_steps or int8.fallback):
        return int8_model, int8, report
    if not embedding:
        raise ToolchainError("export.int8: QAT and the fallback apply to embedding models; a verifier's "
                             "per-user weights come from the hypernetwork")
    images = calibration if identity_images is None or len(identity_images) < 2 else identity_images
    if int8.qat_steps:
        from toolchain.quantize.qat import qat_finetune

        int8_model, report["qat"] = qat_finetune(int8_model, qat_images(images, seed), mean, std,
                                                 steps=int8.qat_steps, lr=int8.qat_lr, batch=int8.qat_batch,
                                                 seed=seed, calibration=calibration, int8=int8, progress=progress)
    if int8.fallback:
        from toolchain.quantize.selection import ranking_indices
        from toolchain.quantize.sensitivity import choose_float_layers, layer_sensitivity

        targets = targets or {}
        if targets.get("min_cosine_mean") is None and targets.get("min_cosine_min") is None:
            raise ToolchainError("export.int8.fallback needs a target: parity.min_embedding_cosine_mean or "
                                 "parity.min_embedding_cosine_min")
        measure = measuring_images(images, seed)
        size, allowed, predicted = _size_rule(int8_model, int8, pte_size) if pte_size is not None else (None,) * 3
        sens = layer_sensitivity(int8_model, calibration, measure[ranking_indices(len(measure))], mean, std, int8,
                                 reference=float_model, agreement=agreement_of(targets), progress=progress)
        choice = choose_float_layers(float_model, sens, measure, mean, std, max_layers=int8.max_float_layers,
                                     min_cosine_mean=targets.get("min_cosine_mean"),
                                     min_cosine_min=targets.get("min_cosine_min"), allowed=allowed, size=predicted,
                                     agreement=agreement_of(targets), progress=progress)
        if size is not None and size["all_int8_bytes"] is not None:
            size["predicted_bytes"] = size["all_int8_bytes"] + FLOAT_WEIGHT_BYTES * float_weight_count(
                int8_model, list(choice["float_layers"]))
            choice["size"] = size
        int8 = dataclasses.replace(int8, float_layers=tuple(choice["float_layers"]))
        report["sensitivity"] = {k: v for k, v in sens.items() if k != "graph"}
        report["fallback"] = {**choice, "targets": fallback_targets_report(targets),
                              "images": int(len(measure)), "ranking_images": int(sens["images"])}
    return int8_model, int8, report
