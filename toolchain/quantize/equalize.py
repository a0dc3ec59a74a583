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

A residual stream (the tensors joined by additions: each block adds its linear projection to
the stream) is equalized the same way as a whole. Every BatchNorm (or biased conv) that writes to
it scales channel i by t_i, every conv that reads it divides its input channel i by t_i, and an
addition or a homogeneous activation inside it commutes with the scale. The stream's ranges are
the largest over all its tensors.

The pairs and streams are found on a torch.fx trace; a model that does not trace, or has no
such pair or stream, is left as it is.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import torch
from torch import nn

MAX_SCALE = 100.0  # a channel silent on the calibration images is not blown up without bound
_HOMOGENEOUS = (nn.ReLU, nn.PReLU, nn.Identity)  # act(t * x) == t * act(x) for t > 0


_ADD = (operator.add, torch.add)


def _single_user(node) -> bool:
    return len(node.users) == 1


def _trace(model: nn.Module):
    """(fx trace, node -> its module or None); (None, None) for a model that does not trace,
    which is then simply not equalized."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: leave the model alone
        return None, None
    modules = dict(traced.named_modules())
    return traced, lambda node: modules.get(node.target) if node.op == "call_module" else None


def equalizable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(producer BatchNorm2d, consumer Conv2d) module names joined by a homogeneous activation,
    each intermediate tensor read only by the next step."""
    traced, module = _trace(model)
    if traced is None:
        return []

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


def _is_add(node) -> bool:
    return (node.op == "call_function" and node.target in _ADD and len(node.args) == 2
            and all(isinstance(a, torch.fx.Node) for a in node.args) and not node.kwargs)


def residual_streams(model: nn.Module) -> list[dict]:
    """Each residual stream: {"nodes": its tensors' fx node names, "writers": the BatchNorm2d or
    Conv2d modules that write to it, "readers": the Conv2d modules that read it, "channels"}.
    A stream with any other writer or reader (a pooling, a multiply, a non-homogeneous
    activation, the graph output) is left out: scaling it would not be exact."""
    traced, module = _trace(model)
    if traced is None:
        return []

    def passes(node):  # inside a stream: an addition, or act(t * x) == t * act(x)
        return _is_add(node) or isinstance(module(node), _HOMOGENEOUS)

    seen: set = set()
    streams = []
    for start in traced.graph.nodes:
        if not _is_add(start) or start in seen:
            continue
        inside, todo = {start}, [start]
        while todo:  # grow through additions and homogeneous activations, both ways
            node = todo.pop()
            links = list(node.users) + (list(node.all_input_nodes) if passes(node) else [])
            for other in links:
                if other not in inside and (passes(other) or other in node.all_input_nodes):
                    inside.add(other)
                    todo.append(other)
        seen |= inside
        writers = [n for n in inside if not passes(n)]
        readers = {u for n in inside for u in n.users if u not in inside}
        ok = all(isinstance(module(w), nn.BatchNorm2d) and module(w).weight is not None
                 or isinstance(module(w), nn.Conv2d) and module(w).bias is not None and module(w).groups == 1
                 for w in writers)
        channels = {module(w).num_features if isinstance(module(w), nn.BatchNorm2d) else module(w).out_channels
                    for w in writers if ok}
        for r in readers:
            conv = module(r)
            ok = ok and isinstance(conv, nn.Conv2d) and len(channels) == 1 and conv.in_channels in channels and (
                conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels)
        if ok and writers:
            streams.append({"nodes": sorted(n.name for n in inside), "writers": sorted(w.target for w in writers),
                            "readers": sorted(r.target for r in readers), "channels": channels.pop()})
    return streams


class _ChannelPeaks(torch.fx.Interpreter):
    """Runs a traced model and keeps each named node's largest magnitude per channel."""

    def __init__(self, traced, names):
        super().__init__(traced)
        self.names, self.peaks = set(names), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            r = out.detach().abs().amax(dim=(0, 2, 3))
            self.peaks[n.name] = r if n.name not in self.peaks else torch.maximum(self.peaks[n.name], r)
        return out


def _scale_out(module: nn.Module, t: torch.Tensor) -> None:
    """Output channel i times t_i (a BatchNorm's affine, or a conv's filter and bias)."""
    if isinstance(module, nn.BatchNorm2d):
        module.weight.mul_(t)
        module.bias.mul_(t)
    else:
        module.weight.mul_(t.view(-1, 1, 1, 1))
        module.bias.mul_(t)


def _scale_in(conv: nn.Conv2d, t: torch.Tensor) -> None:
    """Input channel i divided by t_i (a dense conv's column, a depthwise conv's filter)."""
    conv.weight.div_(t.view(1, -1, 1, 1) if conv.groups == 1 else t.view(-1, 1, 1, 1))


@torch.no_grad()
def equalize_ranges(model: nn.Module, images: np.ndarray, mean, std, batch: int = 16,
                    streams: bool = True) -> tuple[nn.Module, dict]:
    """A copy of `model` with the activation ranges equalized (module docstring), and a report:
    the pairs and streams, and the median and largest channel scale. `images`: uint8 NHWC
    calibration images. `streams=False` leaves the residual streams alone."""
    from toolchain.runtime.preprocess import model_input

    model = copy.deepcopy(model).eval()
    pairs = equalizable_pairs(model)
    streams = residual_streams(model) if streams else []
    if not pairs and not streams:
        return model, {"pairs": 0, "streams": 0}
    modules = dict(model.named_modules())
    # One pass over the calibration images, before any scaling, for the pairs' BatchNorm outputs
    # and every tensor of every stream.
    traced = torch.fx.symbolic_trace(model)
    bn_node = {n.target: n.name for n in traced.graph.nodes if n.op == "call_module"
               and n.target in {bn for bn, _ in pairs}}
    peaks = _ChannelPeaks(traced, list(bn_node.values()) + [n for s in streams for n in s["nodes"]])
    for i in range(0, len(images), batch):
        peaks.run(torch.from_numpy(model_input(images[i:i + batch], mean, std)))

    def channel_scales(r: torch.Tensor) -> torch.Tensor:
        r = r.clamp_min(1e-12)
        return (r.max() / r).clamp(max=MAX_SCALE)

    scales = []
    for bn_name, conv_name in pairs:
        t = channel_scales(peaks.peaks[bn_node[bn_name]])
        _scale_out(modules[bn_name], t)
        _scale_in(modules[conv_name], t)
        scales.append(t)
    for stream in streams:
        t = channel_scales(torch.stack([peaks.peaks[n] for n in stream["nodes"]]).amax(0))
        for w in stream["writers"]:
            _scale_out(modules[w], t)
        for r in stream["readers"]:
            _scale_in(modules[r], t)
        scales.append(t)
    every = torch.cat(scales)
    return model, {"pairs": len(pairs), "streams": len(streams), "channels": int(every.numel()),
                   "scale_median": float(every.median()), "scale_max": float(every.max())}
