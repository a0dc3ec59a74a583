"""Per-layer int8 sensitivity, and the accuracy-aware fallback that keeps the fewest layers in float.

One PT2E calibration and conversion (ExecuTorch's XNNPACK scheme, the recipe's calibration
method) gives the all-int8 graph in torch's reference form, rewritten to compute the same
numbers faster: dequantised weights, and one fake-quantise kernel per int8 activation. A layer
(a convolution or linear module) is made float in that graph (edited in place, then restored)
by giving its op the float weight and, where its output feeds nothing but the model output, by
dropping the output's quantisation. That is what the runtime's file does when the layer is left
out of the quantizer's annotations: its int8 neighbours still quantise at the boundary.

The metric is the one the parity bounds cap: each image's embedding cosine to the float model
(mean and minimum) on identity images. A layer's sensitivity is how much the mean rises when
that layer alone stays float. Measuring it costs one pass over the images per layer, so a
one-pass proxy (the noise int8 adds at each layer: its weights, and the output it writes)
picks the `measure` layers that get measured; the others are listed with the proxy only. With
an agreement target, the table lists each unit's score noise at its threshold too; once that
target is the only one missed, the fallback ranks by the noise on all its measuring images
(toolchain.quantize.selection.ranking_key, ranks_on_all). The
fallback keeps the top-ranked layers in float, one more at a time, until the targets hold on the
measuring images (the mean's lower confidence bound and the minimum, with the rare images int8
gets badly wrong set aside: toolchain.quantize.selection) or `max_layers` are float; the
exported file is then measured in its runtime like any other.

With `fallback_unit: block` the unit is a whole block (`features.3`: every op inside, SiLUs and
adds too). One float conv gains little where the error is in the activations: its output is
still rounded where the next int8 op reads it (SeesawFaceNet, docs/int8-backbones.md).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.fx.node import map_arg

from toolchain.errors import ToolchainError
from toolchain.quantize.bias_correction import correct_model_biases
from toolchain.quantize.pt2e import in_modules, module_of, xnnpack_quantizer
from toolchain.quantize.saturation import narrow_sigmoid_ranges
from toolchain.quantize.selection import (cosine_key, drop_unneeded, embedding_summary, forward_selection,
                                          quietest_short, ranking_indices, ranking_key, ranks_on_all, targets_met)
from toolchain.runtime.preprocess import model_input

_LAYER_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def _batches(images: np.ndarray, batch: int, mean, std):
    """Fixed-size batches (the graph's shapes are static); the last one is filled with repeats."""
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, images[np.arange(batch - n) % len(images)]])
        yield torch.from_numpy(model_input(chunk, mean, std)), n


def mirrored_embeddings(module, images: np.ndarray, batch: int, mean, std) -> np.ndarray:
    """Each image's embedding plus its mirror's, summed and L2-normalised: as parity embeds pair
    images (toolchain.evaluate.parity), so the fallback aims at the cosine the bounds measure.
    (A single view's int8 noise does not average out: on SeesawFaceNet's identity images its
    cosine sat about 0.001 below the parity's.)"""
    out = []
    with torch.no_grad():
        for view in (images, np.ascontiguousarray(images[:, :, ::-1])):
            out.append(np.concatenate([module(x)[:n].flatten(1).numpy().astype(np.float64)
                                       for x, n in _batches(view, batch, mean, std)]))
    e = out[0] + out[1]
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _is(node, name: str) -> bool:
    return getattr(node, "op", "") == "call_function" and str(node.target).endswith(name)


def _attr(graph: nn.Module, name: str) -> torch.Tensor:
    obj = graph
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def fast_reference(converted: nn.Module) -> nn.Module:
    """The converted graph (fold_quantize=False) rewritten to compute the same numbers faster,
    in place: each weight's quantise/dequantise becomes its dequantised constant (the float
    weight's attribute is named by `meta["float_weight"]` of the op that reads it), and each
    activation's quantise/dequantise pair one fake-quantise kernel."""
    g = converted.graph
    k = 0
    for dq in list(g.nodes):
        if not (_is(dq, "dequantize_per_channel.default") and _is(dq.args[0], "quantize_per_channel.default")):
            continue
        q = dq.args[0]
        args = [_attr(converted, str(a.target)) if getattr(a, "op", "") == "get_attr" else a for a in q.args]
        w_q = q.target(*args)
        w_dq = dq.target(w_q, *[_attr(converted, str(a.target)) if getattr(a, "op", "") == "get_attr" else a
                                for a in dq.args[1:]])
        name = f"_int8_weight_{k}"
        k += 1
        converted.register_buffer(name, w_dq.detach().clone())
        with g.inserting_before(dq):
            const = g.get_attr(name)
        for user in list(dq.users):
            user.meta["float_weight"] = str(q.args[0].target)  # an attribute name: its node is dropped below
        dq.replace_all_uses_with(const)
    for q in list(g.nodes):
        if not _is(q, "quantize_per_tensor.default"):
            continue
        deqs = [u for u in q.users if _is(u, "dequantize_per_tensor.default")]
        if not deqs or any(isinstance(a, torch.fx.Node) for a in q.args[1:3]):
            continue
        x, scale, zero_point, qmin, qmax = q.args[:5]
        with g.inserting_after(q):
            fq = g.call_function(torch.fake_quantize_per_tensor_affine,
                                 (x, float(scale), int(zero_point), int(qmin), int(qmax)))
        for d in deqs:
            d.replace_all_uses_with(fq)
    g.eliminate_dead_code()
    converted.recompile()
    return converted


def _layer_nodes(converted: nn.Module) -> dict[str, object]:
    """Module name -> its convolution or linear op in the converted graph, in graph order."""
    out: dict[str, object] = {}
    for n in converted.graph.nodes:
        if n.op == "call_function" and n.target in _LAYER_OPS:
            name = module_of(n)
            if name is not None and name not in out:
                out[name] = n
    return out


def _feeds_only_output(node) -> bool:
    users = list(node.users)
    return bool(users) and all(u.op == "output" or (_is(u, "view.default") or _is(u, "reshape.default")
                                                    or _is(u, "flatten.using_ints")) and _feeds_only_output(u)
                               for u in users)


def _is_fake_quant(node) -> bool:
    return getattr(node, "op", "") == "call_function" and node.target is torch.fake_quantize_per_tensor_affine


class _GraphEdits:
    """Edits of the fast reference graph, made in place (a copy per measurement costs more than
    the evaluation) and undone when `applied()` exits."""

    def __init__(self, graph: nn.Module):
        self.graph = graph
        self.saved: list[tuple[object, tuple]] = []
        self.added: list = []

    def rewire(self, node, args) -> None:
        self.saved.append((node, node.args))
        node.args = args

    def float_weight(self, op) -> None:
        """`op` reads its float weight instead of the int8 one (fast_reference names it)."""
        if "float_weight" in op.meta:
            with self.graph.graph.inserting_before(op):
                self.added.append(self.graph.graph.get_attr(op.meta["float_weight"]))
            self.rewire(op, (op.args[0], self.added[-1], *op.args[2:]))

    def skip_fake_quant(self, fq, src) -> None:
        """Every reader of fake-quantise `fq` reads `src` instead: that tensor is not rounded."""
        for user in list(fq.users):
            self.rewire(user, map_arg(user.args, lambda a: src if a is fq else a))

    @contextlib.contextmanager
    def applied(self):
        self.graph.recompile()
        try:
            yield self.graph
        finally:
            for node, args in reversed(self.saved):
                node.args = args
            for node in self.added:
                self.graph.graph.erase_node(node)
            self.graph.recompile()


@contextlib.contextmanager
def _float_layers(graph: nn.Module, names):
    """The fast reference graph (fast_reference) with the layers `names` computing in float,
    edited in place and restored on exit."""
    nodes = _layer_nodes(graph)
    edits = _GraphEdits(graph)
    for name in names:
        op = nodes[name]
        edits.float_weight(op)
        # The output's own quantisation, when nothing int8 reads it (the embedding layer).
        after = op
        while len(after.users) == 1 and not _is_fake_quant(next(iter(after.users))):
            nxt = next(iter(after.users))
            if nxt.op != "call_function" or nxt.target in _LAYER_OPS:
                break
            after = nxt
        fq = next((u for u in after.users if _is_fake_quant(u)), None)
        if fq is not None and _feeds_only_output(fq):
            edits.skip_fake_quant(fq, after)
    with edits.applied() as edited:
        yield edited


def block_names(model: nn.Module) -> list[str]:
    """The model's blocks, the fallback's units with `fallback_unit: block`: each child of a
    top-level container (nn.Sequential, nn.ModuleList; `features.3`), else the top-level module."""
    names = []
    for name, child in model.named_children():
        subs = [n for n, _ in child.named_children()] if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        names += [f"{name}.{sub}" for sub in subs] or [name]
    return names


def _in_blocks(node, names) -> bool:
    return in_modules(node, names) is not None


@contextlib.contextmanager
def _float_blocks(graph: nn.Module, names):
    """The fast reference graph with every op of the blocks `names` computing in float, as the
    file computes them when they are left out of the quantizer's annotations: float weights, and
    no quantisation of a tensor the block writes and only the block (or the model output) reads.
    What the block writes for an int8 op outside it is still quantised there. In place; restored
    on exit."""
    inside = {n for n in graph.graph.nodes
              if n.op == "call_function" and not _is_fake_quant(n) and _in_blocks(n, names)}
    edits = _GraphEdits(graph)
    for op in inside:
        edits.float_weight(op)
    for fq in [n for n in graph.graph.nodes if _is_fake_quant(n)]:
        if fq.args[0] in inside and (all(u in inside for u in fq.users) or _feeds_only_output(fq)):
            edits.skip_fake_quant(fq, fq.args[0])
    with edits.applied() as edited:
        yield edited


def _float_units(graph: nn.Module, names, unit: str):
    """_float_layers or _float_blocks, by the fallback's unit."""
    return _float_blocks(graph, names) if unit == "block" else _float_layers(graph, names)


def _noise(a: torch.Tensor, b: torch.Tensor) -> float:
    """Noise-to-signal power of `a` against `b`."""
    return float(((a - b).float().pow(2).sum() / b.float().pow(2).sum().clamp_min(1e-30)))


class _LocalError(torch.fx.Interpreter):
    """One pass over the fast reference graph that records, per layer, the error int8 adds where
    it happens: the layer's op with int8 against float weights on the same input, plus the
    fake quantisation of the output it writes. A cheap proxy that picks which layers to measure."""

    def __init__(self, graph: nn.Module, layer_of: dict):
        super().__init__(graph)
        self.layer_of = layer_of  # layer op node -> module name
        self.error: dict[str, float] = {}

    def _producer(self, node):
        while getattr(node, "op", "") == "call_function" and node not in self.layer_of:
            inputs = node.all_input_nodes
            if len(inputs) != 1:
                return None
            node = inputs[0]
        return self.layer_of.get(node)

    def run_node(self, n):
        out = super().run_node(n)
        name = None
        if n in self.layer_of and "float_weight" in n.meta:
            args = self.map_nodes_to_values(n.args, n)
            ref = n.target(args[0], _attr(self.module, n.meta["float_weight"]), *args[2:])
            name, err = self.layer_of[n], _noise(out, ref)
        elif _is_fake_quant(n):
            name, err = self._producer(n.args[0]), _noise(out, self.env[n.args[0]])
        if name is not None:
            self.error[name] = self.error.get(name, 0.0) + err
        return out


def reference_int8_graph(model: nn.Module, calibration: np.ndarray, int8, batch: int, mean, std) -> nn.Module:
    """The all-int8 graph of `model` in torch's reference form (fast_reference), calibrated on
    `calibration` (uint8 NHWC) with the options `int8`, as the `.pte`'s fallback measures it; it
    takes batches of `batch` images. With `int8.bias_correction` its biases are corrected as the
    export corrects the `.pte`'s graph (toolchain.quantize.pt2e), so the fallback judges the file
    it will write: exactly all int8; with units in float, on the all-int8 corrections, where the
    export measures them again with those units float."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = next(_batches(calibration, batch, mean, std))[0]
    graph = torch.export.export(model.eval(), (example,), strict=False).module()
    prepared = prepare_pt2e(graph, xnnpack_quantizer(int8))
    with torch.no_grad():
        for x, _ in _batches(calibration, batch, mean, std):
            prepared(x)
    converted = convert_pt2e(prepared, fold_quantize=False)
    narrow_sigmoid_ranges(converted)  # as the export's int8 graph (toolchain.quantize.pt2e)
    if int8.bias_correction:
        # The graph's batch is static, so a last short batch is filled with repeats, which then
        # weigh twice in the means (none with the recipes' 64 images and batches of 16).
        correct_model_biases(converted, model, example, [x for x, _ in _batches(calibration, batch, mean, std)])
    return fast_reference(converted)


def layer_sensitivity(model: nn.Module, calibration: np.ndarray, images: np.ndarray, mean, std, int8,
                      *, reference: nn.Module | None = None, batch: int = 16, measure: int = 16,
                      agreement: dict | None = None, progress: bool = True) -> dict:
    """Rank the int8 model's layers by the embedding cosine to float each one wins back alone.

    calibration, images: uint8 NHWC (calibration images; identity images measured on).
    reference: the float model the cosines are to (default: `model` itself).
    measure: how many layers get the full measurement (one pass over `images` each); every
    layer gets the local-error proxy (`_LocalError`), which picks those with the largest.
    With `int8.fallback_unit` "block" the units are the model's blocks (block_names), each
    measured, its proxy the sum of its layers'; the rows then name blocks (op "block").
    agreement ({"score_threshold", ...}, toolchain.evaluate.flips.agreement_target): each row
    also has the score noise at the threshold over the pairs among `images`, `score_noise`, and
    how much it fell, `gain_noise`.
    Returns {"all_int8": {cosine_mean, cosine_min}, "layers": [{layer, op, local_error,
    cosine_mean, cosine_min, gain_mean, gain_min}, ...] measured ones first, best first by the
    cosine (the others carry None), "images": n, "measured": k, "graph": converted graph}.
    """
    from toolchain.console import progress_bar
    from toolchain.quantize.int8_options import Int8Options

    int8 = Int8Options.from_any(int8)
    if len(images) < 2:
        raise ToolchainError("int8 sensitivity needs at least 2 images to measure on")
    model = model.eval()
    converted = reference_int8_graph(model, calibration, int8, batch, mean, std)
    ref = mirrored_embeddings((reference or model).eval(), images, batch, mean, std)
    base = embedding_summary(mirrored_embeddings(converted, images, batch, mean, std), ref, agreement)
    layers = _layer_nodes(converted)
    local = _LocalError(converted, {node: name for name, node in layers.items()})
    with torch.no_grad():
        for x, _ in _batches(images, batch, mean, std):
            local.run(x)
    unit = int8.fallback_unit
    if unit == "block":  # every block is measured; its proxy is the sum of its layers'
        graph_nodes = list(converted.graph.nodes)
        units = [b for b in block_names(model) if any(_in_blocks(n, [b]) for n in graph_nodes)]
        proxy = {b: sum(e for name, e in local.error.items() if name == b or name.startswith(b + "."))
                 for b in units}
        op_of = {b: "block" for b in units}
        measure = len(units)
    else:
        units, proxy = list(layers), local.error
        op_of = {name: str(node.target).split(".")[-2] for name, node in layers.items()}
    by_proxy = sorted(units, key=lambda name: -proxy.get(name, 0.0))
    rows, rest = [], []
    with progress_bar(f"int8 sensitivity per {unit}", min(measure, len(units)), enabled=progress) as advance:
        for name in by_proxy[:measure]:
            with _float_units(converted, [name], unit) as g:
                c = embedding_summary(mirrored_embeddings(g, images, batch, mean, std), ref, agreement)
            rows.append({"layer": name, "op": op_of[name], "local_error": proxy.get(name, 0.0), **c,
                         "gain_mean": c["cosine_mean"] - base["cosine_mean"],
                         "gain_min": c["cosine_min"] - base["cosine_min"],
                         **({"gain_noise": base["score_noise"] - c["score_noise"]} if agreement else {})})
            advance(1)
    for name in by_proxy[measure:]:
        rest.append({"layer": name, "op": op_of[name], "local_error": proxy.get(name, 0.0),
                     "cosine_mean": None, "cosine_min": None, "gain_mean": None, "gain_min": None,
                     **({"score_noise": None, "gain_noise": None} if agreement else {})})
    rows.sort(key=lambda r: (-r["gain_mean"], -r["gain_min"]))
    return {"all_int8": base, "layers": rows + rest, "images": int(len(images)), "measured": len(rows),
            "graph": converted, "method": int8.to_dict(), "unit": unit}


def choose_float_layers(model: nn.Module, sensitivity: dict, images: np.ndarray, mean, std, *,
                        min_cosine_mean: float | None, min_cosine_min: float | None, max_layers: int,
                        batch: int = 16, allowed=None, size=None, agreement: dict | None = None,
                        progress: bool = False) -> dict:
    """The fewest top-ranked layers to keep in float so the embedding cosine to float reaches the
    targets (None: not a target), at most `max_layers`. `images`: the measuring images the
    targets are judged on (toolchain.quantize.selection); `sensitivity` was measured on their
    ranking subset, `images[ranking_indices(len(images))]`. Returns {"float_layers": [...],
    "met": bool, "tried": [...], "trail": [{layers, cosine_mean, cosine_mean_low, cosine_min,
    set_aside}, ...]}. `allowed(units) -> bool` (None: any): a choice it refuses is not tried
    (the .pte's size budget, toolchain.quantize.recovery); `size(units) -> bytes`, the file's
    predicted size with them float, lets blocks be ranked by gain per byte when the largest-gain
    steps run out of room (toolchain.quantize.selection.forward_selection's `sized`). When no choice meets the targets,
    `float_layers` is empty (float layers cost latency, and a file that misses its bounds anyway
    is better all int8; the trail shows what each step measured), unless only the agreement
    target was missed: then the quietest choice the steps judged is kept
    (toolchain.quantize.selection.quietest_short). `agreement` ({"score_threshold",
    "max_score_noise"}, from toolchain.evaluate.flips.agreement_target): the score noise at the
    threshold is a target too, judged on the pairs among `images` (each trail row has it as
    `score_noise`). The layers are taken in the order of what the all-int8 graph misses
    (toolchain.quantize.selection.ranking_key): by the noise when only the agreement target is
    missed, each measured layer alone in float judged on all of `images`
    (selection.ranks_on_all), else by the sensitivity table's cosine."""
    graph = sensitivity["graph"]
    ref = mirrored_embeddings(model.eval(), images, batch, mean, std)
    unit = sensitivity.get("unit", "layer")

    def met(c: dict) -> bool:
        return targets_met(c, min_cosine_mean, min_cosine_min, (agreement or {}).get("max_score_noise"))

    judged: dict[tuple[str, ...], dict] = {}  # a noise-ranked step has judged its choice already

    def judge(names: list[str]) -> dict:
        if tuple(names) not in judged:
            with _float_units(graph, names, unit) as g:
                judged[tuple(names)] = embedding_summary(mirrored_embeddings(g, images, batch, mean, std), ref,
                                                         agreement)
        return dict(judged[tuple(names)])

    trail = [{"layers": 0, **judge([])}]
    chosen: list[str] = []
    if met(trail[0]):
        return {"float_layers": [], "met": True, "tried": [], "trail": trail}
    def key_for(judged: dict):  # what the next step ranks by, given the choice so far
        return ranking_key(judged, min_cosine_mean, min_cosine_min)

    if unit == "block":
        return _choose_blocks(sensitivity, images, ref, batch, mean, std, judge, met, max_layers, trail, progress,
                              allowed, key_for, size)
    key = key_for(trail[0])
    measured = [r for r in sensitivity["layers"] if r["gain_mean"] is not None]
    if key is cosine_key:
        gains = [r for r in measured if r["gain_mean"] > 0 or r["gain_min"] > 0]
    else:  # the noise, read on all the measuring images (selection.ranks_on_all)
        alone = {r["layer"]: judge([r["layer"]]) for r in measured if allowed is None or allowed([r["layer"]])}
        gains = [{"layer": name, **c} for name, c in alone.items() if c["score_noise"] < trail[0]["score_noise"]]
    ranked = [r["layer"] for r in sorted(gains, key=key, reverse=True)]
    for name in ranked:
        if len(chosen) == max_layers:
            break
        if allowed is not None and not allowed(chosen + [name]):
            continue
        chosen.append(name)
        c = judge(chosen)
        trail.append({"layers": len(chosen), **c})
        if met(c):
            return {"float_layers": drop_unneeded(chosen, judge, met, trail), "met": True, "tried": list(chosen),
                    "trail": trail}
    short = quietest_short(chosen, trail, key_for)
    return {"float_layers": short.pop("float_units"), **short}


def _choose_blocks(sensitivity: dict, images, ref, batch, mean, std, judge, met, max_layers: int, trail: list,
                   progress: bool, allowed=None, key_for=None, size=None) -> dict:
    """Forward selection over blocks: each step keeps in float the block that does most for the
    bound missed (toolchain.quantize.selection.ranking_key) given the blocks already float,
    ranked on the ranking images, or by the noise on all of `images`.
    Blocks interact where one alone does not: a float block's output is still rounded where the
    next int8 block reads it, and on SeesawFaceNet the stem alone lowered the mean while the stem
    with the next two blocks raised it most (docs/int8-backbones.md). Costs one ranking pass per
    remaining block per step; the first step's (each block alone) are the sensitivity table's, on
    the same graph and images, and reused when the step ranks by the cosine."""
    units = [r["layer"] for r in sensitivity["layers"] if r["cosine_mean"] is not None]
    alone = {r["layer"]: {k: r[k] for k in ("cosine_mean", "cosine_min")}
             for r in sensitivity["layers"] if r["cosine_mean"] is not None}
    pick = ranking_indices(len(images))
    ranking, ranking_ref = images[pick], ref[pick]

    def measure(names: list[str], key) -> dict:
        if ranks_on_all(key):
            return judge(names)
        if len(names) == 1 and names[0] in alone:
            return dict(alone[names[0]])
        with _float_units(sensitivity["graph"], names, "block") as g:
            return embedding_summary(mirrored_embeddings(g, ranking, batch, mean, std), ranking_ref)

    def rank(names: list[str], key) -> dict | None:
        if allowed is not None and not allowed(names):
            return None
        c = measure(names, key)
        return c if size is None else {**c, "bytes": size(names)}

    choice = forward_selection(units, rank, judge, met, max_layers, trail, "int8 fallback: blocks kept in float",
                               progress, key_for, sized=size is not None)
    return {"float_layers": choice.pop("float_units"), **choice}
