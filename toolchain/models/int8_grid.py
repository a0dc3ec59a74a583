"""The int8 weight grid of XNNPACK and TFLite: symmetric, per output channel, [-127, 127].

A float weight already on this grid is quantised with no error: the per-channel scale
max|w|/127 is recovered exactly and every weight is an integer multiple of it. The
hypernetwork's training keeps the shared trunk on the grid for its final steps
(`HypernetConfig.trunk_int8_grid`), so an int8 export adds no weight error there.
"""

from __future__ import annotations

import torch
from torch import nn

QMAX = 127
EPS = 2.0 ** -12  # the XNNPACK quantizer's observer eps: the smallest scale it uses


def grid_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale, shaped to broadcast against `weight` (channel axis 0)."""
    dims = tuple(range(1, weight.dim()))
    return (weight.abs().amax(dim=dims, keepdim=True) / QMAX).clamp(min=EPS)


@torch.no_grad()
def snap_to_int8_grid(module: nn.Module) -> int:
    """Round every conv and linear weight of `module` onto its int8 grid, in place; returns the
    number of weight tensors changed. Idempotent."""
    changed = 0
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            s = grid_scale(m.weight)
            snapped = (m.weight / s).round().clamp(-QMAX, QMAX) * s
            if not torch.equal(snapped, m.weight):
                m.weight.copy_(snapped)
                changed += 1
    return changed


def on_int8_grid(module: nn.Module, atol: float = 1e-6) -> bool:
    """True when every conv/linear weight is an integer multiple of its per-channel scale."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            k = m.weight / grid_scale(m.weight)
            if not torch.allclose(k, k.round(), atol=atol * QMAX):
                return False
    return True
