"""PT2E static int8 for XNNPACK: export, insert observers, calibrate, convert.

Weights are symmetric per-channel int8, activations per-tensor int8 (XNNPACK's native scheme).
The converted module keeps quantize/dequantize pairs that the XNNPACK partitioner folds into
int8 kernels; ops the quantizer does not annotate stay in float between them. PReLU and sigmoid,
which ExecuTorch's quantizer leaves in float, are annotated here too (XNNPACK runs both in int8).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.quantize.fx_nodes import PLUMBING, is_plumbing
from toolchain.quantize.saturation import narrow_sigmoid_ranges, summarize_narrowed
from toolchain.runtime.preprocess import model_input


def calibration_batches(images: np.ndarray, mean, std, batch: int = 16):
    for i in range(0, len(images), batch):
        yield torch.from_numpy(model_input(images[i:i + batch], mean, std))


def float_ops(prepared: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Compute ops the quantizer did not annotate, as (inside, prefix).

    inside: fed by an int8 tensor (an observed output), so int8 is dequantised around them
    (e.g. a layer the fallback keeps in float): float islands in an int8 model. prefix: they read the float input before
    the first quantise (e.g. the verifier's input avg-pool), which a float-input .pte expects.
    """
    inside: dict[str, int] = {}
    prefix: dict[str, int] = {}

    def observed(arg, seen=None) -> bool:
        """Does int8 data reach `arg`? Walks back through plumbing and other float ops (a
        view between an int8 op and a float layer still makes that layer a float island)."""
        seen = set() if seen is None else seen
        if arg in seen:
            return False
        seen.add(arg)
        if getattr(arg, "op", "") == "call_module" and "activation_post_process" in str(arg.target):
            return True
        if getattr(arg, "op", "") != "call_function":
            return False
        return any(observed(a, seen) for a in arg.all_input_nodes)

    for n in prepared.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if any(p in name for p in PLUMBING) or "quantize" in name:
            continue
        ann = n.meta.get("quantization_annotation")
        if ann is None or not getattr(ann, "_annotated", True):
            args = [a for a in n.all_input_nodes]
            target = inside if any(observed(a) for a in args) else prefix
            target[name] = target.get(name, 0) + 1
    return inside, prefix


def through_plumbing(node):
    """The first ancestor of `node` that computes something: layout plumbing (a view, reshape,
    permute; e.g. the row stem's) is seen through."""
    while is_plumbing(node):
        node = node.args[0]
    return node


def pin_input_qparams(converted: nn.Module, scale: float, zero_point: int) -> int:
    """Set the quantise/dequantise of the graph input to (scale, zero_point); returns how many
    nodes changed. The observer's range is data-dependent; where the input values are known to
    sit on an int8 grid (toolchain.quantize.exact_input) the grid itself is the right range."""
    def from_input(node) -> bool:
        return getattr(through_plumbing(node), "op", "") == "placeholder"

    def reads_input(node) -> bool:
        src = node.args[0]
        if from_input(src):
            return True
        return "quantize_per_tensor" in str(getattr(src, "target", "")) and from_input(src.args[0])

    changed = 0
    for n in converted.graph.nodes:
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and reads_input(n):
            n.args = (n.args[0], float(scale), int(zero_point), *n.args[3:])
            changed += 1
    converted.recompile()
    return changed


def align_output_qparams(converted: nn.Module, threshold: float) -> tuple[float, int]:
    """Move the graph output's int8 quantisation so `threshold` sits on a bin edge
    (toolchain.quantize.decision); returns the new (scale, zero_point)."""
    from toolchain.quantize.decision import threshold_aligned_qparams

    out = next(n for n in reversed(converted.graph.nodes) if n.op == "output")
    deq = out.args[0][0] if isinstance(out.args[0], (list, tuple)) else out.args[0]
    q = deq.args[0] if "dequantize_per_tensor" in str(getattr(deq, "target", "")) else None
    if q is None or "quantize_per_tensor" not in str(getattr(q, "target", "")):
        raise ToolchainError("int8 export: the output is not an int8 quantise/dequantise pair; "
                             "cannot align it with the threshold")
    scale, zp = threshold_aligned_qparams(float(deq.args[1]), int(deq.args[2]), threshold)
    for n in (q, deq):
        n.args = (n.args[0], scale, zp, *n.args[3:])
    converted.recompile()
    return scale, zp


def write_head_quant(converted: nn.Module, compute_head) -> dict:
    """Replace the converted graph's per-user head quantisation with `compute_head(feature_scale)`
    (a toolchain.quantize.head.HeadQuant; feature_scale: the int8 scale of the head's input here).
    The head's linear layers are found by their bias parameters' names (head.*.bias); their int8
    weights and per-channel scales, and the quantise/dequantise pairs after each, take the values
    computed. Returns {"head": HeadQuant, "feature_scale": float}."""
    import torch

    linears = {}
    for n in converted.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default and len(n.args) > 2 \
                and getattr(n.args[2], "op", "") == "get_attr" and str(n.args[2].target).startswith("head."):
            linears[str(n.args[2].target).rsplit(".", 1)[0]] = n
    if not linears:
        raise ToolchainError("int8 export: no per-user head (head.*) linear layers in the converted graph")
    first = linears[min(linears, key=lambda k: int(k.split(".")[1]))]
    deq_in = through_plumbing(first.args[0])
    if "dequantize_per_tensor" not in str(getattr(deq_in, "target", "")):
        raise ToolchainError("int8 export: the head's input is not an int8 dequantise")
    head = compute_head(float(deq_in.args[1]))
    for q in head.layers:
        node = linears.get(q.name)
        if node is None:
            raise ToolchainError(f"int8 export: per-user layer {q.name} not found in the converted graph")
        deq_w = node.args[1]
        if "dequantize_per_channel" not in str(getattr(deq_w, "target", "")):
            raise ToolchainError(f"int8 export: {q.name}'s weight is not per-channel int8")
        weight_attr, scale_attr = deq_w.args[0].target, deq_w.args[1].target
        setattr(converted, weight_attr, torch.from_numpy(q.weight_q.copy()))
        setattr(converted, scale_attr, torch.from_numpy(q.weight_scale.astype(np.float32).copy()))
        # The activation this layer writes: through its ReLU (if any) to the quantise/dequantise.
        after = next(iter(node.users))
        if after.target == torch.ops.aten.relu.default:
            after = next(iter(after.users))
        if "quantize_per_tensor" not in str(after.target):
            raise ToolchainError(f"int8 export: {q.name}'s output is not quantised")
        pair = [after] + [u for u in after.users if "dequantize_per_tensor" in str(u.target)]
        for n in pair:
            n.args = (n.args[0], float(q.output_scale), int(q.output_zero_point), *n.args[3:])
    converted.recompile()
    return {"head": head, "feature_scale": float(deq_in.args[1])}


def _own_pool_range(base):
    """The XNNPACK quantizer, except that a global average pool's output gets its own observer.

    The stock annotation shares the pool's input range with its output; a 7x7 mean is several
    times smaller than the map's maximum, so the pooled features kept only a few int8 levels
    (on the demo verifier: step 0.0148 where the pooled values needed 0.0023). XNNPACK's int8
    global average pooling takes distinct input and output quantisation; the graph still lowers
    to one partition.

    PReLUs (with their slopes as a parameter) and sigmoids are annotated too, which the stock
    quantizer leaves in float (annotate_prelu, annotate_sigmoid), and reshapes of an int8 tensor
    (flatten, unsqueeze, ...) keep its quantisation (_share_input_quantization).

    Ops of the modules named in `float_layers` lose their annotations, so they read and write
    float and the int8 ops around them quantise at the boundary (this ExecuTorch's
    XNNPACKQuantizer refuses `set_module_name(name, None)`).

    Tensors that the modules named in `full_range_layers` write get MinMax observers
    (_full_range)."""
    import torch

    class OwnPoolRangeQuantizer(base):
        float_layers: tuple[str, ...] = ()
        full_range_layers: tuple[str, ...] = ()

        def _in_float_layer(self, node) -> bool:
            return in_modules(node, self.float_layers) is not None

        def annotate(self, model):
            model = super().annotate(model)
            spec = self.global_config.output_activation if self.global_config else None
            popped = set()
            for n in model.graph.nodes:
                if self.float_layers and n.op == "call_function" and self._in_float_layer(n):
                    if n.meta.pop("quantization_annotation", None) is not None:
                        popped.add(n)
                    continue
                ann = n.meta.get("quantization_annotation")
                if spec is not None and ann is not None and n.op == "call_function" and \
                        n.target == torch.ops.aten.adaptive_avg_pool2d.default:
                    ann.output_qspec = spec
                if spec is not None and ann is None and n.op == "call_function" and \
                        n.target == torch.ops.aten.sigmoid.default:
                    annotate_sigmoid(n, self.global_config.input_activation)
                if spec is not None and n.op == "call_function" and n.target == torch.ops.aten.prelu.default:
                    annotate_prelu(n, self.global_config.input_activation, spec)
                if n.op == "call_function" and n.target in _SHAPE_OPS and ann is None:
                    _share_input_quantization(n)
            _read_reshapes_as_written(model)
            _drop_dangling_shares(model, popped)
            if self.full_range_layers:
                _full_range(model, self.full_range_layers)
            return model

    return OwnPoolRangeQuantizer


def in_modules(node, names) -> str | None:
    """Which of the module names `names` the node was traced inside, if any."""
    name = module_of(node)
    return next((n for n in names if name is not None and (name == n or name.startswith(n + "."))), None)


def _full_range(model, names: tuple[str, ...]) -> None:
    """Every tensor an op of the modules `names` writes is observed by a MinMaxObserver: the
    op's output spec, and the input spec of any op that reads the tensor (inside those modules
    or after them), so one observer still serves each tensor and no requantise appears at their
    edge. Each original observer constructor gets one MinMax constructor, so specs that agreed
    still agree. Fake-quantised (QAT) specs are left as they are. Raises ToolchainError for a
    name that matches no op."""
    import dataclasses

    from torchao.quantization.pt2e.observer import MinMaxObserver, ObserverBase
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    swapped: dict[int, object] = {}

    def minmax(spec):
        ctor = getattr(spec, "observer_or_fake_quant_ctr", None)
        partial = getattr(ctor, "p", None)
        if not isinstance(spec, QuantizationSpec) or spec.is_dynamic or partial is None or \
                not (isinstance(partial.func, type) and issubclass(partial.func, ObserverBase)):
            return spec
        if id(ctor) not in swapped:
            kwargs = {k: v for k, v in (partial.keywords or {}).items() if k != "percentile"}
            swapped[id(ctor)] = MinMaxObserver.with_args(**kwargs)
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=swapped[id(ctor)])

    inside = {n: in_modules(n, names) for n in model.graph.nodes if n.op == "call_function"}
    found = {m for m in inside.values() if m is not None}
    missing = [n for n in names if n not in found]
    if missing:
        raise ToolchainError(f"export.int8.full_range_layers: {', '.join(missing)} is not a module of the model "
                             "(names as in named_modules(), e.g. features.3)")
    for n in model.graph.nodes:
        ann = n.meta.get("quantization_annotation")
        if ann is None:
            continue
        if inside.get(n):
            ann.output_qspec = minmax(ann.output_qspec)
        ann.input_qspec_map = {a: minmax(q) if inside.get(a) else q for a, q in ann.input_qspec_map.items()}


def _drop_dangling_shares(model, popped: set) -> None:
    """Ops that share the quantisation of a float layer's op (a flatten after a PReLU kept in
    float, say) lose their annotation too: with nothing to share, PT2E's prepare fails
    (KeyError), and a view of a float tensor is float anyway. Repeats until nothing changes."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    def dangling(spec) -> bool:
        if not isinstance(spec, SharedQuantizationSpec):
            return False
        ref = spec.edge_or_node
        return (ref[1] if isinstance(ref, tuple) else ref) in popped

    changed = bool(popped)
    while changed:
        changed = False
        for n in model.graph.nodes:
            ann = n.meta.get("quantization_annotation")
            if ann is None:
                continue
            if dangling(ann.output_qspec) or any(dangling(q) for q in ann.input_qspec_map.values()):
                n.meta.pop("quantization_annotation")
                popped.add(n)
                changed = True


# XNNPACK's int8 sigmoid writes [0, 1) on this fixed grid, as TFLite's int8 LOGISTIC does.
SIGMOID_SCALE, SIGMOID_ZERO_POINT = 1.0 / 256.0, -128


def annotate_sigmoid(node, input_spec) -> None:
    """An int8 sigmoid: input on the calibrated range, output on the fixed [0, 1) grid, and each
    consumer reading that output on the same grid (no second rounding in between). ExecuTorch's
    quantizer leaves sigmoid in float; its partitioner takes the int8 one with
    toolchain.export.executorch's sigmoid config."""
    from torchao.quantization.pt2e.quantizer import (
        FixedQParamsQuantizationSpec,
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )

    # (qscheme given: QAT's fixed fake quantisation refuses none)
    out = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=SIGMOID_SCALE, zero_point=SIGMOID_ZERO_POINT,
                                       quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    node.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={node.args[0]: input_spec}, output_qspec=out, _annotated=True)
    for user in node.users:
        ann = user.meta.get("quantization_annotation")
        if ann is not None and node in ann.input_qspec_map:
            ann.input_qspec_map[node] = SharedQuantizationSpec(node)


# Ops that only reshape or copy: XNNPACK runs them on int8 data when they read and write the same
# int8 quantisation. Unannotated, a quantised tensor was converted to float for them and back
# (found in the delegate's own graph, toolchain.export.xnnpack_graph: SeesawFaceNet's int8 .pte
# held 75 float reshapes and 90 converts, in its SE blocks and channel shuffles).
_SHAPE_OPS = {torch.ops.aten.flatten.using_ints, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
              torch.ops.aten.squeeze.dims, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
              torch.ops.aten.contiguous.default, torch.ops.aten.clone.default}


def _share_input_quantization(node) -> None:
    """A reshape of an int8 tensor keeps that tensor's quantisation (input and output)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    src = node.args[0]
    src_ann = getattr(src, "meta", {}).get("quantization_annotation")
    if src_ann is None or src_ann.output_qspec is None:
        return
    shared = SharedQuantizationSpec(src)
    node.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={src: shared}, output_qspec=shared, _annotated=True)


def _read_reshapes_as_written(model) -> None:
    """Each op reading a reshape that keeps its input's quantisation reads it on that same grid.
    With a range of its own, an int8 tensor on a fixed grid (a sigmoid's, reshaped for the SE
    multiply) was requantised on the way: a Convert to float and back in XNNPACK."""
    from torchao.quantization.pt2e.quantizer import QuantizationSpec, SharedQuantizationSpec

    for n in model.graph.nodes:
        ann = n.meta.get("quantization_annotation")
        if n.op != "call_function" or n.target not in _SHAPE_OPS or ann is None or \
                not isinstance(ann.output_qspec, SharedQuantizationSpec):
            continue
        for user in n.users:
            user_ann = user.meta.get("quantization_annotation")
            if user_ann is not None and type(user_ann.input_qspec_map.get(n)) is QuantizationSpec:
                user_ann.input_qspec_map[n] = SharedQuantizationSpec(n)


def annotate_prelu(node, input_spec, output_spec, qat: bool = False) -> None:
    """An int8 PReLU: input and output on the given activation specs, the slopes one per-tensor
    symmetric int8 weight (XNNPACK's int8 PReLU takes a per-tensor int8 slope tensor, not
    per-channel scales); `qat`: fake-quantised slopes, for toolchain.quantize.qat. ExecuTorch's
    quantizer leaves PReLU in float; its partitioner takes the int8 one with
    toolchain.export.executorch's PReLU config. Only PReLUs whose slopes are a parameter."""
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec

    if node.meta.get("quantization_annotation") is not None or getattr(node.args[1], "op", "") != "get_attr":
        return
    observer = MinMaxObserver.with_args(eps=2 ** -12)
    slope = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric,
                             observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer) if qat else observer)
    node.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={node.args[0]: input_spec, node.args[1]: slope}, output_qspec=output_spec, _annotated=True)


def xnnpack_quantizer(int8):
    """ExecuTorch's XNNPACK quantizer for `int8` (toolchain.quantize.int8_options.Int8Options):
    its calibration observers, pooled features with their own range, and the modules of
    `int8.float_layers` left unannotated, so they stay in float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    from toolchain.quantize.int8_options import with_calibration

    config = with_calibration(get_symmetric_quantization_config(is_per_channel=True), int8)
    quantizer = _own_pool_range(XNNPACKQuantizer)().set_global(config)
    quantizer.float_layers = tuple(int8.float_layers)
    quantizer.full_range_layers = tuple(int8.full_range_layers)
    return quantizer


def module_of(node) -> str | None:
    """The name of the innermost module a graph node was traced from (torch.export's stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else None


def quantize_xnnpack_int8(model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
                          mean, std, report: dict | None = None,
                          input_qparams: tuple[float, int] | None = None,
                          output_threshold: float | None = None, compute_head=None, int8=None) -> nn.Module:
    """PT2E int8 with ExecuTorch's XNNPACK quantizer (pooled features get their own range);
    see quantize_pt2e for the arguments."""
    from toolchain.quantize.int8_options import Int8Options

    int8 = Int8Options.from_any(int8)
    quantizer = xnnpack_quantizer(int8)
    if report is not None and int8.float_layers:
        report["float_layers"] = list(int8.float_layers)
    return quantize_pt2e(model, example, calibration, mean, std, quantizer, report=report,
                         input_qparams=input_qparams, output_threshold=output_threshold, compute_head=compute_head,
                         bias_correction=int8.bias_correction)


def quantize_pt2e(model: nn.Module, example: torch.Tensor, calibration: np.ndarray, mean, std, quantizer,
                  report: dict | None = None, input_qparams: tuple[float, int] | None = None,
                  output_threshold: float | None = None, fold_quantize: bool = True,
                  compute_head=None, bias_correction: bool = False) -> nn.Module:
    """Return the converted (fake-quantized) graph module, ready for a second torch.export.
    If `report` is a dict, it receives `float_ops` and `float_prefix_ops` (see float_ops()).
    `input_qparams` (scale, zero_point) replaces the calibrated quantisation of the input;
    `output_threshold` aligns the output's with a verifier's decision threshold; `compute_head`
    (see write_head_quant) replaces a verifier's per-user head quantisation, output included,
    and `report["head"]` then holds what was written. `bias_correction` corrects every bias but
    the model's per-user tensors (toolchain.quantize.bias_correction; `report["bias_correction"]`)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # Calibrate at the batch size of the export (1), so batch-dependent shapes stay static.
    graph = torch.export.export(model.eval(), (example,), strict=False).module()
    prepared = prepare_pt2e(graph, quantizer)
    if report is not None:
        report["float_ops"], report["float_prefix_ops"] = float_ops(prepared)
    with torch.no_grad():
        for x in calibration_batches(calibration, mean, std, batch=1):
            prepared(x)
    converted = convert_pt2e(prepared, fold_quantize=fold_quantize)
    narrowed = narrow_sigmoid_ranges(converted)  # exact: see toolchain.quantize.saturation
    if report is not None and narrowed:
        report["sigmoid_ranges"] = summarize_narrowed(narrowed)
    if input_qparams is not None and pin_input_qparams(converted, *input_qparams) != 2:
        raise ToolchainError("int8 export: could not find the input quantise/dequantise pair to pin")
    if bias_correction:
        from toolchain.quantize.bias_correction import correct_model_biases

        corrected = correct_model_biases(converted, model, example,
                                         list(calibration_batches(calibration, mean, std, batch=1)))
        if report is not None:
            report["bias_correction"] = corrected
    if compute_head is not None:
        if not fold_quantize:
            raise ToolchainError("int8 export: the per-user head is written into folded int8 weights")
        written = write_head_quant(converted, compute_head)
        if report is not None:
            report.update(written)
    elif output_threshold is not None:
        align_output_qparams(converted, output_threshold)
    return converted
