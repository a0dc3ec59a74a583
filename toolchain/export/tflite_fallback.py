"""The int8 `.tflite`'s accuracy-aware fallback: units of the model left in float by the TFLite
converter, chosen in LiteRT itself.

The converter quantises the calibrated float model (toolchain.export.tflite_calibration) and
leaves every op named in `denylisted_nodes` in float, with a DEQUANTIZE before and a QUANTIZE
after it; the file keeps int8 input and output. The float ops' weights are then stored in
float16 (`half_float_weights`), so that a float unit costs 1 byte a weight more than int8, not 3:
within SeesawFaceNet's size budget, that is the difference between no float block and the
three its recipe keeps. The flatbuffer names ops by their output tensors (onnx2tf's Keras
names), which say nothing of the torch modules. So ops are matched to modules by their weights:
each weighted op (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED), in the file's order, is the
unmatched Conv2d or Linear of the same kind and shape whose weights point the same
way channel by channel (the converter folds BatchNorm into them), the earliest the torch model
runs on a tie. An op without weights belongs to
the unit of the weighted op before it; a plumbing op (PAD, RESHAPE, ...) to the one after it,
whose input it prepares. Units follow `export.int8.fallback_unit`: a conv or linear `layer` alone,
or a `block` (toolchain.quantize.sensitivity.block_names) with every op in it.

The choice is a forward selection measured on the file LiteRT runs (its XNNPACK delegate, one
thread): each step keeps in float the unit that does most for the bound the choice so far misses,
the cosine to the float model's embeddings (image plus mirror, as parity embeds pair images) or
the score noise at the agreement target's threshold, until the targets hold
(toolchain.quantize.selection), then a backward pass puts back in int8 each unit the others meet
them without. A unit whose file would pass `max_bytes` is not tried; when the steps then miss
the targets, a second pass ranks by gain per byte of the file (`forward_selection`'s `sized`). One step
costs a conversion (0.1 s for MobileFaceNet) and a pass over the ranking images per remaining
unit (over all the measuring images when the step ranks by the noise), and one over all the
measuring images. When no selection meets the targets, nothing is kept (float ops cost latency,
and a file that misses its bounds anyway is better all int8; the trail shows what each step
measured) unless only the agreement target was missed: then the quietest choice is kept
(toolchain.quantize.selection.quietest_short), as in the `.pte`'s fallback.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name
from toolchain.quantize.recovery import agreement_of
from toolchain.quantize.selection import (embedding_summary, forward_selection, ranking_indices, ranking_key,
                                          ranks_on_all, targets_met)
from toolchain.quantize.sensitivity import block_names

_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# Ops that only move or pad their input: they belong with the op that reads them.
_PLUMBING = ("PAD", "PADV2", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE")


def _torch_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, dict]]:
    """(module name, {(the TFLite op it may become, weight shape): its weights in that layout})
    of every Conv2d and Linear, in the order one forward pass runs them. A depthwise conv becomes
    a DEPTHWISE_CONV_2D, or a grouped CONV_2D (onnx2tf writes some that way)."""
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[str, dict]] = []

    def hook(module, _inputs, _output):
        w = module.weight.detach().float().numpy()
        if isinstance(module, nn.Linear):
            seen.append((names[module], {("FULLY_CONNECTED", w.shape): w}))
            return
        ohwi = w.transpose(0, 2, 3, 1)
        forms = {("CONV_2D", ohwi.shape): ohwi}
        if module.groups > 1 and module.groups == module.in_channels == w.shape[0]:
            forms[("DEPTHWISE_CONV_2D", (1, *ohwi.shape[1:3], w.shape[0]))] = ohwi.transpose(3, 1, 2, 0)
        seen.append((names[module], forms))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _channel_similarity(a: np.ndarray, b: np.ndarray, axis: int) -> float:
    """Mean over output channels of |cosine| between two weight tensors: BatchNorm folding scales
    each channel, so only each channel's direction is compared."""
    a, b = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1), np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1)
    dot = np.abs((a * b).sum(1))
    return float(np.mean(dot / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)))


def _match_layers(fb, graph, weighted: list, layers: list[tuple[str, dict]]) -> dict[int, str]:
    """{id(op): layer name}. The file may order parallel branches differently from torch, so each
    weighted op, in the file's order, takes the unmatched layer of the same op and shape whose
    weights point the same way channel by channel (the earliest on a tie: 1x1 depthwise weights
    have one value per channel, so only their order tells them apart)."""
    owner: dict[int, str] = {}
    free = list(range(len(layers)))
    for kind, op in weighted:
        tensor = graph.tensors[op.inputs[1]]
        key = (kind, tuple(int(s) for s in tensor.shape))
        candidates = [i for i in free if key in layers[i][1]]
        if not candidates:
            raise ToolchainError(f"the .tflite's {kind} {key[1]} matches no conv or linear layer of the model left: "
                                 "cannot tell which ops are which layer")
        data = fb.buffers[tensor.buffer].data
        if data is not None and len(data) == 4 * int(np.prod(key[1])) and len(candidates) > 1:
            w = np.frombuffer(bytes(data), "<f4").reshape(key[1])
            axis = 3 if kind == "DEPTHWISE_CONV_2D" else 0
            scores = [round(_channel_similarity(w, layers[i][1][key], axis), 6) for i in candidates]
            best = candidates[int(np.argmax(scores))]  # argmax: the first of equal scores
        else:
            best = candidates[0]
        free.remove(best)
        owner[id(op)] = layers[best][0]
    return owner


def op_units(calibrated: bytes, model: nn.Module, example: torch.Tensor, blocks: list[str] | None) -> dict[str, list[str]]:
    """{unit name: the output-tensor names of its ops in the calibrated flatbuffer}. Units are the
    torch model's conv and linear layers, or with `blocks` the blocks that hold them. Raises
    ToolchainError when the file's weighted ops do not match the model's layers one to one."""
    schema, fb = load_flatbuffer(calibrated)
    graph = fb.subgraphs[0]
    layers = _torch_layers(model, example)
    ops = [(op_name(schema, fb, op), op) for op in graph.operators]
    weighted = [(kind, op) for kind, op in ops if kind in _WEIGHTED]
    if len(weighted) != len(layers):
        raise ToolchainError(f"the .tflite has {len(weighted)} weighted ops and the model {len(layers)} conv/linear "
                             "layers: cannot tell which ops are which layer")
    owner = _match_layers(fb, graph, weighted, layers)
    # Every other op joins the unit before it, plumbing the unit after it; what is left at
    # either end joins the nearest unit.
    assigned: list[str | None] = [owner.get(id(op)) for _, op in ops]
    before = None
    for i, (kind, _) in enumerate(ops):
        if assigned[i] is None and kind not in _PLUMBING:
            assigned[i] = before
        before = assigned[i] or before
    after = None
    for i in reversed(range(len(ops))):
        assigned[i] = assigned[i] or after
        after = assigned[i]
    for i in range(1, len(ops)):
        assigned[i] = assigned[i] or assigned[i - 1]

    def unit_of(layer: str) -> str:
        if blocks is None:
            return layer
        return next((b for b in blocks if layer == b or layer.startswith(b + ".")), layer)

    units: dict[str, list[str]] = {}
    for i, (kind, op) in enumerate(ops):
        if blocks is None and kind not in _WEIGHTED:
            continue  # a layer alone: its output is rounded where the next int8 op reads it
        name = graph.tensors[op.outputs[0]].name
        units.setdefault(unit_of(assigned[i]), []).append(name.decode() if isinstance(name, bytes) else str(name))
    return units


def unit_tensors(calibrated: bytes, model: nn.Module, example: torch.Tensor, names) -> list[str]:
    """The output-tensor names of the ops of `names` in the calibrated flatbuffer: each a block
    of the model (every op in it) or a conv or linear layer (its op). Raises ToolchainError for
    a name that is neither, or when the file's ops cannot be matched to the model's layers."""
    blocks = op_units(calibrated, model, example, block_names(model))
    layers = op_units(calibrated, model, example, None)
    unknown = [n for n in names if n not in blocks and n not in layers]
    if unknown:
        raise ToolchainError(f"export.int8.full_range_layers: {', '.join(unknown)} is neither a block nor a conv "
                             f"or linear layer of the model (blocks: {', '.join(list(blocks)[:6])}, ...)")
    return [t for n in names for t in (blocks.get(n) or layers[n])]


def quantize_keeping_float(calibrated: bytes, float_ops: list[str]) -> bytes:
    """The converter's full-integer file (int8 input and output) with `float_ops` (output-tensor
    names) left in float, their weights stored in float16 (`half_float_weights`)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert

    quantized = convert.mlir_quantize(calibrated, fully_quantize=True, input_data_type=tf.int8,
                                      output_data_type=tf.int8, denylisted_nodes=list(float_ops) or None)
    return half_float_weights(quantized) if float_ops else quantized


def half_float_weights(buf: bytes) -> bytes:
    """`buf` with the float32 weights of its float conv and linear ops stored as float16, each
    read through a DEQUANTIZE that XNNPACK unpacks once, when it loads the file (the layout of
    TFLite's own float16 quantization). A float unit then costs 2 bytes a weight instead of 4,
    and computes in float32 from weights rounded to float16 (11 significant bits, against int8's
    8). Weights shared between ops, or not constant, are left as they are."""
    from toolchain.export.tflite_flatbuffer import pack_flatbuffer

    schema, fb = load_flatbuffer(buf)
    graph = fb.subgraphs[0]
    readers = Counter(t.buffer for t in graph.tensors)

    def lone_float32_weight(op) -> int | None:
        """The index of `op`'s weight tensor when it is constant float32 read by `op` alone."""
        if op_name(schema, fb, op) not in _WEIGHTED or len(op.inputs) < 2 or op.inputs[1] < 0:
            return None
        weight = graph.tensors[int(op.inputs[1])]
        data = fb.buffers[weight.buffer].data
        lone = weight.type == schema.TensorType.FLOAT32 and data is not None and len(data) and readers[weight.buffer] == 1
        return int(op.inputs[1]) if lone else None

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    code.version = 3  # DEQUANTIZE of a float16 input (TFLite's op versioning)
    operators, opcode = [], None
    for op in graph.operators:
        index = lone_float32_weight(op)
        if index is not None:
            if opcode is None:
                fb.operatorCodes.append(code)
                opcode = len(fb.operatorCodes) - 1
            weight = graph.tensors[index]
            half = schema.BufferT()
            half.data = np.frombuffer(np.frombuffer(bytes(fb.buffers[weight.buffer].data), "<f4").astype("<f2")
                                      .tobytes(), np.uint8)
            fb.buffers[weight.buffer].data = None  # the float32 tensor is now the DEQUANTIZE's output
            fb.buffers.append(half)
            stored = schema.TensorT()
            stored.shape, stored.type, stored.buffer = weight.shape, schema.TensorType.FLOAT16, len(fb.buffers) - 1
            stored.name = (weight.name or b"") + b"_float16"
            graph.tensors.append(stored)
            unpack = schema.OperatorT()
            unpack.opcodeIndex, unpack.inputs, unpack.outputs = opcode, [len(graph.tensors) - 1], [index]
            operators.append(unpack)
        operators.append(op)
    if opcode is None:
        return buf
    graph.operators = operators
    return pack_flatbuffer(fb, len(buf))


def litert_embeddings(buf: bytes, inputs: np.ndarray) -> np.ndarray:
    """The file's outputs for normalised NHWC float `inputs`, one image per call, run by LiteRT
    with its XNNPACK delegate on one thread (as parity runs it)."""
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.runtime.preprocess import dequantize, quantize

    interpreter = Interpreter(model_content=buf, num_threads=1)
    interpreter.allocate_tensors()
    feed, fetch = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (si, zi), (so, zo) = feed["quantization"], fetch["quantization"]
    out = []
    for k in range(len(inputs)):
        interpreter.set_tensor(feed["index"], quantize(inputs[k:k + 1], si, zi))
        interpreter.invoke()
        out.append(dequantize(interpreter.get_tensor(fetch["index"]), so, zo).reshape(-1))
    return np.stack(out).astype(np.float64)


def _cosines(buf: bytes, views: tuple[np.ndarray, np.ndarray], reference: np.ndarray,
             agreement: dict | None = None) -> dict:
    e = litert_embeddings(buf, views[0]) + litert_embeddings(buf, views[1])
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return embedding_summary(e, reference, agreement)


def choose_float_units(calibrated: bytes, units: dict[str, list[str]], views: tuple[np.ndarray, np.ndarray],
                       reference: np.ndarray, *, min_cosine_mean: float | None, min_cosine_min: float | None,
                       max_units: int, max_bytes: int | None = None, progress: bool = False,
                       also_try: Sequence[str] = (), agreement: dict | None = None,
                       finish: Callable[[bytes], bytes] | None = None) -> dict:
    """Forward selection (module docstring): candidates ranked on the ranking subset of the
    measuring images, each step judged on all (toolchain.quantize.selection). views: the
    measuring images and their mirrors, normalised NHWC float32; reference: the float model's
    embeddings of image plus mirror, L2-normalised. Returns {"float_units", "met", "tried",
    "trail"}; each trail row has the file's bytes.

    also_try: units chosen elsewhere (the `.pte`'s fallback), judged by the same rule when the
    greedy choice misses or keeps more units than it, and kept when it meets the targets: the
    fallback keeps the fewest units it found. Greedy steps take the largest gain whatever it
    costs in bytes, so one large unit can spend the size budget before the targets hold:
    SeesawFaceNet at export seed 2 took `features.9` (52 KB) and ran out of room; given the
    `.pte`'s five blocks, it passed. Such a run now also gets a second pass by gain per byte
    (toolchain.quantize.selection.forward_selection), before the `.pte`'s units are tried. And a
    step ranked on 32 images can add a unit that helps
    little on all of them: on the Intel Xeon, SeesawFaceNet's seed 0 took six blocks where the
    `.pte` kept four. Its trail row has `units` and `source` in place of `added`; the result's
    "from" is ".pte" and "why" says which case it was. `agreement`: as in
    toolchain.quantize.sensitivity.choose_float_layers, a score-noise target judged on all the
    measuring images. `finish(file) -> file`: what the export does to the chosen file after
    this choice (its bias correction); every judged file gets it, so the targets are judged on
    the file as written. Ranking stays on unfinished files: a correction per candidate would
    cost VarGFaceNet's steps 83 s a unit."""
    pick = ranking_indices(len(reference))
    ranking_views, ranking_reference = (views[0][pick], views[1][pick]), reference[pick]

    def met(c: dict) -> bool:
        return targets_met(c, min_cosine_mean, min_cosine_min, (agreement or {}).get("max_score_noise"))

    def file_keeping(names: list[str]) -> bytes:
        return quantize_keeping_float(calibrated, [op for n in names for op in units[n]])

    judged_sets: set[frozenset[str]] = set()

    def judge(names: list[str]) -> dict:
        judged_sets.add(frozenset(names))
        candidate = file_keeping(names)
        if finish is not None:
            candidate = finish(candidate)
        return {**_cosines(candidate, views, reference, agreement), "bytes": len(candidate)}

    trail = [{"layers": 0, **judge([])}]
    if met(trail[0]):
        return {"float_units": [], "met": True, "tried": [], "trail": trail}

    def rank(names: list[str], key) -> dict | None:
        candidate = file_keeping(names)
        if max_bytes is not None and len(candidate) > max_bytes:
            return None
        if ranks_on_all(key):
            return {**_cosines(candidate, views, reference, agreement), "bytes": len(candidate)}
        return {**_cosines(candidate, ranking_views, ranking_reference), "bytes": len(candidate)}

    choice = forward_selection(list(units), rank, judge, met, max_units, trail,
                               "int8 fallback (.tflite): units kept in float", progress,
                               lambda judged: ranking_key(judged, min_cosine_mean, min_cosine_min),
                               sized=max_bytes is not None)
    other = list(also_try)
    fewer = choice["met"] and len(other) < len(choice["float_units"])
    worth_judging = (fewer or not choice["met"]) and set(other) <= set(units)
    if not other or not worth_judging or frozenset(other) in judged_sets:
        # Nothing to try, or a set already judged: by a forward step, or by the backward pass,
        # which would have kept it had it met the targets.
        return choice
    judged = judge(other)
    if max_bytes is not None and judged["bytes"] > max_bytes:
        return choice
    trail.append({"layers": len(other), "units": other, "source": "the .pte's choice", **judged})
    if not met(judged):
        return choice
    why = "fewer units" if fewer else "own steps missed"
    return {**choice, "float_units": other, "met": True, "from": ".pte", "why": why}


@dataclasses.dataclass
class FloatPlan:
    """What the int8 `.tflite` keeps in float: the units `given` (export.int8.float_layers), or,
    with `fallback`, the forward selection's choice towards `targets`
    ({"min_cosine_mean", "min_cosine_min"}, and optionally the agreement target's
    "score_threshold" and "max_score_noise") within `max_bytes`. `model` and `example`: the torch
    form the file was converted from, to name its ops. `views`, `reference` and `also_try` (the
    `.pte`'s float units): see choose_float_units. `float_ops` fills `report`."""
    model: nn.Module
    example: torch.Tensor
    unit: str = "layer"
    given: tuple[str, ...] = ()
    fallback: bool = False
    views: tuple[np.ndarray, np.ndarray] | None = None
    reference: np.ndarray | None = None
    targets: dict = dataclasses.field(default_factory=dict)
    max_units: int = 8
    max_bytes: int | None = None
    also_try: tuple[str, ...] = ()
    progress: bool = False
    report: dict = dataclasses.field(default_factory=dict)

    def float_ops(self, calibrated: bytes, finish: Callable[[bytes], bytes] | None = None) -> list[str]:
        """The output-tensor names of the ops to leave in float in `calibrated`. `finish`: see
        choose_float_units."""
        blocks = block_names(self.model) if self.unit == "block" else None
        if not self.fallback:
            if not self.given:
                return []
            units = op_units(calibrated, self.model, self.example, blocks)
            unknown = [u for u in self.given if u not in units]
            if unknown:
                raise ToolchainError(f"export.int8.float_layers: {', '.join(unknown)} not among the .tflite's "
                                     f"{self.unit}s ({', '.join(list(units)[:6])}, ...)")
            self.report = {"float_units": list(self.given), "given": True, "unit": self.unit}
            return [op for u in self.given for op in units[u]]
        try:
            units = op_units(calibrated, self.model, self.example, blocks)
        except ToolchainError as exc:  # the file stays all int8; the report says why
            self.report = {"float_units": [], "met": None, "unit": self.unit, "error": str(exc)}
            return []
        choice = choose_float_units(calibrated, units, self.views, self.reference,
                                    min_cosine_mean=self.targets.get("min_cosine_mean"),
                                    min_cosine_min=self.targets.get("min_cosine_min"), max_units=self.max_units,
                                    max_bytes=self.max_bytes, progress=self.progress,
                                    also_try=self.also_try, agreement=agreement_of(self.targets), finish=finish)
        self.report = {**choice, "unit": self.unit, "targets": dict(self.targets), "max_bytes": self.max_bytes,
                       "judged_bias_corrected": finish is not None,  # finish is the export's bias correction
                       "images": int(len(self.reference)), "ranking_images": len(ranking_indices(len(self.reference)))}
        kept = [op for u in choice["float_units"] for op in units[u]]
        if kept:
            self.report["latency"] = latency_cost(quantize_keeping_float(calibrated, kept),
                                                  quantize_keeping_float(calibrated, []), self.views[0][:1])
        return kept


def latency_cost(mixed: bytes, all_int8: bytes, image: np.ndarray, repeats: int = 30) -> dict:
    """What the float units cost: LiteRT's `invoke()` time of each file (XNNPACK, one thread),
    the median of `repeats`, less a one-op model's (toolchain.runtime.litert_runner)."""
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.runtime.base import median_ms
    from toolchain.runtime.litert_runner import invoke_overhead_ms
    from toolchain.runtime.preprocess import quantize

    def ms(buf: bytes) -> float:
        interpreter = Interpreter(model_content=buf, num_threads=1)
        interpreter.allocate_tensors()
        feed = interpreter.get_input_details()[0]
        interpreter.set_tensor(feed["index"], quantize(image, *feed["quantization"]))
        return max(0.0, median_ms(interpreter.invoke, repeats) - invoke_overhead_ms())

    out = {"with_float_layers": ms(mixed), "all_int8": ms(all_int8)}
    return {**out, "ratio": out["with_float_layers"] / max(out["all_int8"], 1e-9),
            "source": "LiteRT invoke() less a one-op model's invoke()"}
