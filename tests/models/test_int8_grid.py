"""The int8 weight grid: snapping is idempotent and per-channel int8 quantisation then loses nothing."""

import torch

from toolchain.models import build_model
from toolchain.models.int8_grid import grid_scale, on_int8_grid, snap_to_int8_grid


def test_snapped_weights_quantise_without_error():
    torch.manual_seed(0)
    trunk = build_model("verifier").features
    assert not on_int8_grid(trunk)
    assert snap_to_int8_grid(trunk) == 7  # the seven convolutions
    assert on_int8_grid(trunk) and snap_to_int8_grid(trunk) == 0  # idempotent
    for m in trunk.modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight.detach()
            scale = grid_scale(w).flatten()
            q = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32),
                                                       0, -127, 127)
            assert torch.equal(q, w)
