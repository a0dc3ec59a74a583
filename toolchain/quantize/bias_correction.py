"""Empirical bias correction of a converted PT2E int8 graph (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019, section 4.2, the empirical variant).

Rounding weights and activations shifts the mean of a layer's output; the shift adds up through
the layers, and a verifier's logit moves against its threshold. For every convolution and linear
layer with a bias, the mean of (int8 graph's output - float graph's output) per output channel
over the calibration images is subtracted from the bias. Layers are corrected in graph order, each
measured after the ones before it were corrected, so a correction never double-counts a shift an
earlier layer already removed. One sweep does it: the int8 graph runs node by node on every
calibration image at once, and each layer is corrected, and its outputs recomputed, before the
nodes after it run. (A pass of the whole graph per layer, as before, made a trained SeesawFaceNet's
int8 export take 56 minutes: 109 layers, 64 images, other jobs on the 2 cores. The sweep adds
155 s to quantisation's 70 s there, with one other job.)

Biases the caller names in `skip` keep their value: a verifier's per-user tensors, whose int8
values the fleet path computes without running the graph (toolchain.quantize.head).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from toolchain.quantize.batchnorm import fold_batchnorm

_LAYERS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def _biased_layers(gm: nn.Module) -> dict[str, str]:
    """{node name: bias attribute} of the conv/linear nodes whose bias is a module attribute."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _LAYERS and len(n.args) > 2 \
                and getattr(n.args[2], "op", "") == "get_attr":
            out[n.name] = str(n.args[2].target)
    return out


def _owner(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, leaf = target.split(".")
    owner = gm
    for p in path:
        owner = getattr(owner, p)
    return owner, leaf


def _tapped(gm: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `gm` that returns the outputs of the nodes `names`, in that order."""
    gm = copy.deepcopy(gm)
    gm.graph._codegen = torch.fx.graph.CodeGen()  # plain positional in, tuple out (no export pytree specs)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(nodes[k] for k in names),)
    gm.graph.lint()
    gm.recompile()
    return gm


def _channel_sum(y: torch.Tensor) -> np.ndarray:
    """Per-channel mean of one output batch, times its batch size (dim 1 is the channel; a 2-D
    output's columns)."""
    dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 2 else [0]
    return y.double().mean(dim=dims).numpy() * y.shape[0]


def _mean(outputs: list[torch.Tensor]) -> np.ndarray:
    """Per-channel mean over the batches `outputs`."""
    return sum(_channel_sum(y) for y in outputs) / max(sum(int(y.shape[0]) for y in outputs), 1)


def _channel_means(gm: nn.Module, names: list[str], inputs) -> list[np.ndarray]:
    """Per-channel mean of each of the nodes `names` over the input batches (one pass, summed as
    it goes: every layer's outputs for every image would not fit for a backbone)."""
    tapped = _tapped(gm, names)
    sums: list = [0.0] * len(names)
    count = 0
    with torch.no_grad():
        for x in inputs:
            outs = tapped(x)
            sums = [s + _channel_sum(y) for s, y in zip(sums, outs)]
            count += int(outs[0].shape[0])
    return [s / max(count, 1) for s in sums]


def correct_biases(converted: nn.Module, float_graph: nn.Module, inputs, skip=()) -> dict:
    """Correct `converted`'s biases in place against `float_graph` (the same model exported in
    float, node names alike) on `inputs` (an iterable of input batches; consumed twice, so a
    list). Returns {"layers": n corrected, "mean_abs_shift": mean |correction| over channels,
    "skipped": [bias names left alone]}."""
    inputs = list(inputs)
    q_layers, f_layers = _biased_layers(converted), _biased_layers(float_graph)
    skipped = sorted(b for b in q_layers.values() if any(b == s or b.startswith(s + ".") for s in skip))
    names = [n for n, b in q_layers.items() if n in f_layers and b not in skipped]
    if not names:
        return {"layers": 0, "mean_abs_shift": 0.0, "skipped": skipped}
    float_means = dict(zip(names, _channel_means(float_graph, names, inputs)))
    # One interpreter per image, all stepped through the graph together.
    runs = [torch.fx.Interpreter(converted) for _ in inputs]
    for run, x in zip(runs, inputs):
        run.args_iter = iter([x])
    shifts = []
    with torch.no_grad():
        for node in converted.graph.nodes:
            if node.op == "output":
                break
            for run in runs:
                run.env[node] = run.run_node(node)
            if node.name in float_means:
                shift = _mean([run.env[node] for run in runs]) - float_means[node.name]
                bias_node = node.args[2]
                owner, leaf = _owner(converted, str(bias_node.target))
                bias = getattr(owner, leaf)
                corrected = (bias.detach() - torch.from_numpy(shift.astype(np.float32)).to(bias.dtype)).clone()
                # A new tensor, never an in-place edit: the exported graph shares its parameters
                # with the caller's float model.
                setattr(owner, leaf, nn.Parameter(corrected, requires_grad=False)
                        if isinstance(bias, nn.Parameter) else corrected)
                for run in runs:  # the layer's outputs again, with the corrected bias
                    run.env[bias_node] = corrected
                    run.env[node] = run.run_node(node)
                shifts.append(np.abs(shift))
            for run in runs:  # free what no later node reads
                for done in run.user_to_last_uses.get(node, []):
                    del run.env[done]
    converted.recompile()
    return {"layers": len(names), "mean_abs_shift": float(np.mean(np.concatenate(shifts))), "skipped": skipped}


def correct_model_biases(converted: nn.Module, model: nn.Module, example: torch.Tensor, inputs) -> dict:
    """correct_biases of `converted`, the PT2E int8 graph of `model`, against `model` in float:
    a second export (node names alike) with its BatchNorms folded into the convolutions as PT2E
    folds them, since an unfolded convolution has no bias to compare (found on MobileFaceNet,
    where bias correction then changed nothing). `example`: an input of the graph's shape. A
    verifier's per-user biases keep their value."""
    float_graph = torch.export.export(fold_batchnorm(model)[0], (example,), strict=False).module()
    per_user = model.per_user_tensors() if hasattr(model, "per_user_tensors") else []
    return correct_biases(converted, float_graph, inputs, skip=[n for n in per_user if n.endswith(".bias")])
