"""Calibration images on which the float model's activations explode, left out of calibration.

An int8 activation range is set by the calibration images. One image on which the model's
activations run tens of times above the rest stretches the ranges of every layer it passes,
and the other images are then left a few int8 steps. On the VarGFaceNet recipe's briefly trained
model, one of 64 calibration images reached 472 at `features.15` against a median of 6.47, and
torch's int8 reference graph scored a mean embedding cosine of 0.74 to float; without that image
0.9994 (docs/int8-backbones.md).

`screen_outliers` runs the float model once over the images, takes each image's largest
activation magnitude at every leaf module, divides it by that module's median over the images,
and leaves out the images whose largest ratio exceeds `factor`. The images left out are still
images the app may see: their int8 outputs clip, and the parity bounds measure that.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from toolchain.errors import ToolchainError


@torch.no_grad()
def activation_peaks(model: nn.Module, images: np.ndarray, mean, std, batch: int = 16) -> tuple[list[str], np.ndarray]:
    """(leaf module names, (images, modules) array of each image's largest |output| there)."""
    from toolchain.runtime.preprocess import model_input

    leaves = [(name, m) for name, m in model.named_modules() if name and not list(m.children())]
    peaks: dict[str, list[torch.Tensor]] = {name: [] for name, _ in leaves}
    hooks = []
    for name, module in leaves:
        def record(_module, _inputs, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() >= 1:
                peaks[name].append(out.detach().abs().flatten(1).amax(1) if out.dim() > 1 else out.detach().abs())
        hooks.append(module.register_forward_hook(record))
    try:
        model.eval()
        for i in range(0, len(images), batch):
            model(torch.from_numpy(model_input(images[i:i + batch], mean, std)))
    finally:
        for h in hooks:
            h.remove()
    names = [n for n, _ in leaves if peaks[n] and sum(len(p) for p in peaks[n]) == len(images)]
    return names, np.stack([torch.cat(peaks[n]).float().numpy() for n in names], axis=1)


def screen_outliers(model: nn.Module, images: np.ndarray, mean, std, factor: float) -> tuple[np.ndarray, dict]:
    """(the images kept, a report). An image is left out when its activation peak at some leaf
    module exceeds `factor` times the median peak of the images there. Raises ToolchainError
    when that would leave fewer than half the images: then the set has no typical image to
    measure against, and `factor` is too low for this model."""
    names, peaks = activation_peaks(model, images, mean, std)
    median = np.median(peaks, axis=0)
    ratio = peaks / np.maximum(median, 1e-12)
    worst = ratio.max(axis=1)
    dropped = np.flatnonzero(worst > factor)
    if len(images) - len(dropped) < (len(images) + 1) // 2:
        raise ToolchainError(f"export.int8.outlier_factor {factor:g} would leave out {len(dropped)} of "
                             f"{len(images)} calibration images; raise it (the typical worst ratio here is "
                             f"{float(np.median(worst)):.1f})")
    report = {"factor": float(factor), "images": int(len(images)),
              "left_out": [{"image": int(i), "ratio": round(float(worst[i]), 1),
                            "layer": names[int(ratio[i].argmax())]} for i in dropped],
              "median_worst_ratio": round(float(np.median(worst)), 2)}
    keep = np.setdiff1d(np.arange(len(images)), dropped)
    return np.ascontiguousarray(images[keep]), report
