"""Cross-layer range equalization: every channel of an int8 activation uses the tensor's range.

An int8 activation has one range per tensor (XNNPACK, LiteRT), set by its widest channel, so a
channel whose values span a tenth of that range keeps a tenth of the 256 steps. Where a
convolution (with its BatchNorm) feeds another through an activation that commutes with a
positive per-channel scale (ReLU, PReLU, none), scaling channel i by t_i > 0 on the way out and
by 1 / t_i on the way in changes nothing in float:

    conv2(act(t * bn(conv1(x)))) / t  ==  conv2(act(bn(conv1(x))))   (per channel, t > 0)

With t_i = R / r_i (r_i: channel i's largest magnitude on the calibration images, R: the
largest r), every channel spans the full range. The producer's per-channel weight quantisation
absorbs t exactly; so does a depthwise consumer's. A dense consumer's weight column i shrinks by
t_i, which costs it weight precision: the activations' error dominates here (MobileFaceNet:
cosine to float 0.99899 with only activations fake-quantised, 0.99994 with only weights).
This is the activation form of AIMET's cross-layer equalization (Nagel et al. 2019, "Data-Free
Quantization", which equalizes weight ranges instead).

The pairs are found on a torch.fx trace; a model that does not trace, or has no such pair, is
left as it is.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

MAX_SCALE = 100.0  # a channel silent on the calibration images is not blown up without bound
_HOMOGENEOUS = (nn.ReLU, nn.PReLU, nn.Identity)  # act(t * x) == t * act(x) for t > 0


def _single_user(node) -> bool:
    return len(node.users) == 1


def equalizable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(producer BatchNorm2d, consumer Conv2d) module names joined by a homogeneous activation,
    each intermediate tensor read only by the next step."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - untraceable models are simply not equalized
        return []
    modules = dict(traced.named_modules())

    def module(node):
        return modules.get(node.target) if node.op == "call_module" else None

    pairs = []
    for node in traced.graph.nodes:
        bn = module(node)
        if not isinstance(bn, nn.BatchNorm2d) or not _single_user(node) or bn.weight is None:
            continue
        conv_in = node.args[0]
        if not isinstance(module(conv_in), nn.Conv2d) or not _single_user(conv_in):
            continue
        nxt = next(iter(node.users))
        while isinstance(module(nxt), _HOMOGENEOUS) and _single_user(nxt):
            nxt = next(iter(nxt.users))
        consumer = module(nxt)
        if not isinstance(consumer, nn.Conv2d) or consumer.in_channels != bn.num_features:
            continue
        depthwise = consumer.groups == consumer.in_channels == consumer.out_channels
        if consumer.groups != 1 and not depthwise:
            continue
        pairs.append((node.target, nxt.target))
    return pairs


@torch.no_grad()
def equalize_ranges(model: nn.Module, images: np.ndarray, mean, std, batch: int = 16) -> tuple[nn.Module, dict]:
    """A copy of `model` with the activation ranges equalized (module docstring), and a report:
    the pairs, and the median and largest channel scale. `images`: uint8 NHWC calibration images."""
    from toolchain.runtime.preprocess import model_input

    model = copy.deepcopy(model).eval()
    pairs = equalizable_pairs(model)
    if not pairs:
        return model, {"pairs": 0}
    modules = dict(model.named_modules())
    ranges: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, _inputs, out):
            r = out.detach().abs().amax(dim=(0, 2, 3))
            ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)
        return hook

    hooks = [modules[bn].register_forward_hook(record(bn)) for bn, _ in pairs]
    try:
        for i in range(0, len(images), batch):
            model(torch.from_numpy(model_input(images[i:i + batch], mean, std)))
    finally:
        for h in hooks:
            h.remove()
    scales = []
    for bn_name, conv_name in pairs:
        bn, conv = modules[bn_name], modules[conv_name]
        r = ranges[bn_name].clamp_min(1e-12)
        t = (r.max() / r).clamp(max=MAX_SCALE)
        bn.weight.mul_(t)
        bn.bias.mul_(t)
        if conv.groups == 1:
            conv.weight.div_(t.view(1, -1, 1, 1))
        else:
            conv.weight.div_(t.view(-1, 1, 1, 1))
        scales.append(t)
    every = torch.cat(scales)
    return model, {"pairs": len(pairs), "channels": int(every.numel()),
                   "scale_median": float(every.median()), "scale_max": float(every.max())}
