"""Cross-layer range equalization: exact in float, every channel on the full int8 range, and a
smaller int8 error where channel ranges differ."""

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.models import build_model
from toolchain.models.registry import ModelSpec
from toolchain.quantize.equalize import MAX_SCALE, equalizable_pairs, equalize_ranges, residual_streams
from toolchain.quantize.pt2e import quantize_xnnpack_int8


def _images(n, seed=0):
    """Random 7x7 patterns blown up to 112x112: the 16x16 pooling below keeps all their variety."""
    small = np.random.default_rng(seed).integers(0, 256, (n, 7, 7, 3), dtype=np.uint8)
    return small.repeat(16, axis=1).repeat(16, axis=2)


def _x(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Unequal(nn.Module):
    """conv-BN-PReLU into a depthwise conv, then conv-BN-ReLU into a dense 1x1: BatchNorm's scales
    spread the channels over two decades, so a per-tensor int8 range starves the narrow ones."""

    def __init__(self, act=nn.PReLU):
        super().__init__()
        self.a = nn.Sequential(nn.AvgPool2d(16), nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               act(16) if act is nn.PReLU else act())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Conv2d(16, 8, 1, bias=False)
        self.head = nn.Sequential(nn.Flatten(1), nn.Linear(8 * 7 * 7, 16, bias=False))
        self.spec = ModelSpec(name="unequal", output="embedding", output_dim=16)
        with torch.no_grad():  # BatchNorm's statistics from images, then scales over 1.5 decades
            self.train()(_x(_images(32, 9)))
            spread = torch.logspace(-1.5, 0, 16)
            self.a[2].weight.copy_(spread)
            self.dw[1].weight.copy_(spread.flip(0))
        self.eval()

    def forward(self, x):
        return self.head(self.pw(self.dw(self.a(x))))


def test_pairs_skip_tensors_read_twice_and_non_homogeneous_activations():
    # MobileFaceNet: stem and its depthwise conv, the head's 1x1 into the GDC, and inside each of
    # the 15 bottlenecks expand -> depthwise -> project; a block output also read by a residual
    # add is left alone.
    assert len(equalizable_pairs(build_model("mobilefacenet").eval())) == 33
    assert equalizable_pairs(Unequal().eval()) == [("a.2", "dw.0"), ("dw.1", "pw")]
    assert equalizable_pairs(Unequal(nn.SiLU).eval()) == [("dw.1", "pw")]  # SiLU(t x) != t SiLU(x)


def test_equalization_is_exact_and_fills_every_channel_range():
    torch.manual_seed(0)
    model = Unequal().eval()
    images = _images(16)
    eq, report = equalize_ranges(model, images, model.spec.mean, model.spec.std)
    assert report["pairs"] == 2 and report["channels"] == 32 and report["scale_max"] <= MAX_SCALE
    x = _x(_images(4, 1))
    with torch.no_grad():
        ref, out = model(x), eq(x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # Every channel of each equalized BatchNorm output now spans (nearly) the widest one's range.
    seen = {}
    hooks = [getattr(eq, n.split(".")[0])[int(n.split(".")[1])].register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o.abs().amax((0, 2, 3)))) for n in ("a.2", "dw.1")]
    with torch.no_grad():
        eq(_x(images))
    for h in hooks:
        h.remove()
    for r in seen.values():
        assert float(r.min() / r.max()) > 0.99
    assert float(model.a[2].weight[0].detach()) == pytest.approx(10 ** -1.5)  # the original is untouched


def _int8_error(m, ref, x, calib) -> float:
    """Mean 1 - cosine of torch's reference int8 graph of `m` to the float outputs `ref`."""
    with torch.no_grad():
        q = quantize_xnnpack_int8(m, x[:1], calib, m.spec.mean, m.spec.std)
        out = torch.cat([q(x[i:i + 1]) for i in range(len(x))])
    return float((1 - nn.functional.cosine_similarity(out, ref, dim=1)).mean())


def test_equalization_shrinks_the_int8_error():
    torch.manual_seed(0)
    model = Unequal().eval()
    calib, x = _images(16), _x(_images(16, 2))
    eq, _ = equalize_ranges(model, calib, model.spec.mean, model.spec.std)
    with torch.no_grad():
        ref = model(x)
    before, after = _int8_error(model, ref, x, calib), _int8_error(eq, ref, x, calib)
    assert after < 0.5 * before, (before, after)


class Stream(nn.Module):
    """A residual stream of 16 channels written by two BatchNorms whose scales spread the channels
    over two decades, read by a 1x1 conv inside the block and one after it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.AvgPool2d(16), nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.body = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.PReLU(16),
                                  nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.out = nn.Conv2d(16, 8, 1, bias=False)
        self.spec = ModelSpec(name="stream", output="embedding", output_dim=8 * 49)
        with torch.no_grad():
            self.train()(_x(_images(32, 9)))
            spread = torch.logspace(-2, 0, 16)
            self.stem[2].weight.copy_(spread)
            self.body[4].weight.copy_(spread)
        self.eval()

    def forward(self, x):
        s = self.stem(x)
        return self.out(s + self.body(s)).flatten(1)


def test_residual_streams_are_found_whole_or_not_at_all():
    streams = residual_streams(Stream().eval())
    assert [(s["writers"], s["readers"], s["channels"]) for s in streams] == [
        (["body.4", "stem.2"], ["body.0", "out"], 16)]
    # MobileFaceNet: three streams (64, 128, 128 channels), each written by its strided block and
    # by every residual block after it.
    mfn = residual_streams(build_model("mobilefacenet").eval())
    assert [(s["channels"], len(s["writers"])) for s in mfn] == [(64, 5), (128, 7), (128, 3)]

    class Pooled(Stream):  # the stream also feeds a pooling: a channel scale would reach the output
        def forward(self, x):
            s = self.stem(x) + self.body(self.stem(x))
            return torch.cat([self.out(s).flatten(1), s.mean((2, 3))], 1)

    assert residual_streams(Pooled().eval()) == []


def test_stream_equalization_is_exact_and_shrinks_the_int8_error():
    torch.manual_seed(0)
    model = Stream().eval()
    calib, x = _images(16), _x(_images(16, 2))
    pairs_only, report = equalize_ranges(model, calib, model.spec.mean, model.spec.std, streams=False)
    assert report["streams"] == 0
    both, report = equalize_ranges(model, calib, model.spec.mean, model.spec.std)
    assert report["streams"] == 1 and report["pairs"] == 1
    with torch.no_grad():
        ref = model(x)
        assert float((both(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    before, after = _int8_error(pairs_only, ref, x, calib), _int8_error(both, ref, x, calib)
    assert after < 0.5 * before, (before, after)
