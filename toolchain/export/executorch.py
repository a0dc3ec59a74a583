"""ExecuTorch `.pte` export, lowered to XNNPACK, with a delegation check after lowering.

fp32: torch.export -> to_edge_transform_and_lower(XnnpackPartitioner).
int8: PT2E static int8 (toolchain.quantize.pt2e) -> the input made channels-last before its
quantise (toolchain.export.nhwc_input) -> torch.export -> the same lowering.
The `.pte` keeps float input and output; the int8 model quantises inside the XNNPACK graph
(its scale/zero-point are recorded in the metadata as `internal_quantization`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from toolchain.errors import CheckFailed, ToolchainError
from toolchain.export.nhwc_input import drop_noop_as_strided, nhwc_before_quantize
from toolchain.quantize.pt2e import through_plumbing

# Nodes that exist outside any partition by construction (the delegate call's output tuple).
_STRUCTURAL_OPS = {"getitem"}


def xnnpack_partitioner():
    """ExecuTorch's XNNPACK partitioner, taking int8 sigmoids and PReLUs too.

    ExecuTorch 1.5.1's `SigmoidConfig` and `PreluConfig` list fp32 only, so a quantised sigmoid
    or PReLU (annotated by toolchain.quantize.pt2e) stayed a float op inside the partition.
    XNNPACK itself runs both in int8; these configs only let the partitioner hand them over
    (tests/export/test_int8_silu.py and test_executorch_prelu.py run such files against torch's
    reference)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        GenericNodePartitionerConfig,
        SigmoidConfig,
    )
    from executorch.backends.xnnpack.partition.config.node_configs import PreluConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.backends.xnnpack.utils.utils import is_param_node

    both = [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]

    class Int8SigmoidConfig(SigmoidConfig):
        def supported_precision_types(self):
            return both

    class Int8PreluConfig(GenericNodePartitionerConfig):
        """PreluConfig's rule (the slope is a parameter, read through its dequantise when int8),
        with the generic config's int8 pattern: dequantised inputs, a quantised output."""
        target_name = "prelu.default"

        def check_constraints(self, node, ep) -> bool:
            slope = node.all_input_nodes[1]
            slope = slope.all_input_nodes[0] if is_dequant(slope) else slope
            return self.check_common_constraints(node, ep) and is_param_node(ep, slope)

        def get_original_aten(self):
            return torch.ops.aten.prelu.default

        def supported_precision_types(self):
            return both

    swap = {SigmoidConfig: Int8SigmoidConfig, PreluConfig: Int8PreluConfig}
    return XnnpackPartitioner(configs=[swap.get(c, c) for c in ALL_PARTITIONER_CONFIGS])


@dataclass
class DelegationReport:
    partitions: int
    delegated_nodes: int
    non_delegated_nodes: int
    ops_outside: dict[str, int] = field(default_factory=dict)  # op -> occurrences left outside
    head_feature_scale: float | None = None  # int8 verifier: the scale of the per-user head's input
    float_ops: dict[str, int] = field(default_factory=dict)  # int8 model: float islands inside int8
    float_prefix_ops: dict[str, int] = field(default_factory=dict)  # int8 model: float ops on the input
    bias_correction: dict | None = None  # int8 model: what toolchain.quantize.bias_correction changed
    sigmoid_ranges: dict | None = None  # int8 model: ranges narrowed before sigmoids (toolchain.quantize.saturation)
    # The delegate's own XNNPACK graph (toolchain.export.xnnpack_graph): {"op precision": count}
    # of every node, and of an int8 file's nodes that touch a float tensor (its float I/O aside).
    xnnpack_ops: dict[str, int] = field(default_factory=dict)
    xnnpack_float_nodes: dict[str, int] = field(default_factory=dict)

    @property
    def fully_delegated(self) -> bool:
        return self.partitions == 1 and not self.ops_outside

    @property
    def int8_end_to_end(self) -> bool:
        """No float island between int8 ops, by the quantizer's annotations and by the XNNPACK
        graph in the file (a float prefix on the float input is allowed)."""
        return not self.float_ops and not self.xnnpack_float_nodes

    def to_dict(self) -> dict:
        return {"backend": "XnnpackBackend", "partitions": self.partitions,
                "delegated_nodes": self.delegated_nodes, "non_delegated_nodes": self.non_delegated_nodes,
                "ops_outside": dict(self.ops_outside), "float_ops": dict(self.float_ops),
                "float_prefix_ops": dict(self.float_prefix_ops), "fully_delegated": self.fully_delegated,
                "xnnpack_ops": dict(self.xnnpack_ops), "xnnpack_float_nodes": dict(self.xnnpack_float_nodes),
                **({"bias_correction": self.bias_correction} if self.bias_correction else {}),
                **({"sigmoid_ranges": self.sigmoid_ranges} if self.sigmoid_ranges else {})}


def delegation_report(edge_manager) -> DelegationReport:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge_manager.exported_program().graph_module)
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items()
               if b.non_delegated > 0 and op not in _STRUCTURAL_OPS}
    return DelegationReport(partitions=info.num_delegated_subgraphs, delegated_nodes=info.num_delegated_nodes,
                            non_delegated_nodes=info.num_non_delegated_nodes, ops_outside=outside)


def _first_quant_params(graph_module: nn.Module) -> tuple[dict | None, dict | None]:
    """(first quantise, last dequantise) of a converted PT2E graph: where int8 begins and ends.

    Ops the quantizer leaves unannotated before the first quantise (e.g. the verifier's input
    avg-pool) run in float; `after` names the op feeding the first quantise.
    """
    q_in = q_out = None
    nodes = list(graph_module.graph.nodes)
    for n in nodes:
        t = str(n.target)
        if n.op == "call_function" and t.endswith("quantize_per_tensor.default") and "dequantize" not in t:
            src = through_plumbing(n.args[0])
            q_in = {"scale": float(n.args[1]), "zero_point": int(n.args[2]), "dtype": "int8",
                    "after": "input" if getattr(src, "op", "") == "placeholder" else str(getattr(src, "name", src))}
            break
    out_node = next(n for n in reversed(nodes) if n.op == "output")
    src = out_node.args[0]
    src = src[0] if isinstance(src, (list, tuple)) else src
    if src is not None and str(getattr(src, "target", "")).endswith("dequantize_per_tensor.default"):
        q_out = {"scale": float(src.args[1]), "zero_point": int(src.args[2]), "dtype": "int8"}
    return q_in, q_out


def export_executorch(model: nn.Module, example: torch.Tensor, precision: str,
                      calibration: np.ndarray | None, mean, std,
                      require_full_delegation: bool, metadata_fn,
                      input_qparams: tuple[float, int] | None = None,
                      output_threshold: float | None = None,
                      compute_head=None, int8=None) -> tuple[bytes, dict, DelegationReport]:
    """Return (pte bytes, metadata, delegation report). `metadata_fn(internal_quant)` builds the
    metadata dict. Raises CheckFailed if full delegation is required and not reached.
    `input_qparams` pins the int8 input quantisation (see toolchain.quantize.exact_input);
    `output_threshold` aligns the int8 output with a decision threshold (toolchain.quantize.decision);
    `compute_head` writes a verifier's per-user head quantisation (toolchain.quantize.pt2e.write_head_quant);
    `int8`: the recipe's calibration method and bias correction (toolchain.quantize.int8_options)."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    from toolchain.export.metadata import pte_constant_methods

    internal = None
    qreport: dict = {}
    if precision == "int8":
        from toolchain.quantize.pt2e import quantize_xnnpack_int8

        converted = quantize_xnnpack_int8(model, example, calibration, mean, std, report=qreport,
                                         input_qparams=input_qparams, output_threshold=output_threshold,
                                         compute_head=compute_head, int8=int8)
        q_in, q_out = _first_quant_params(converted)
        internal = {"input": q_in, "output": q_out}
        # The NCHW input goes NHWC as float, before its quantise (toolchain.export.nhwc_input).
        program = torch.export.export(nhwc_before_quantize(converted), (example,), strict=False)
    else:
        program = torch.export.export(model.eval(), (example,), strict=False)
    meta = metadata_fn(internal)
    try:
        edge = to_edge_transform_and_lower(program, transform_passes=[drop_noop_as_strided],
                                           partitioner=[xnnpack_partitioner()],
                                           constant_methods=pte_constant_methods(meta))
    except Exception as exc:  # noqa: BLE001 - a lowering bug or unsupported pattern: name it
        cause = exc.__cause__ or exc
        raise ToolchainError(f"ExecuTorch/XNNPACK lowering of {meta['model']} {precision} failed: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''} "
                             f"({str(exc).splitlines()[0]})") from exc
    report = delegation_report(edge)  # kept in the manifest, not inside the file
    report.float_ops = qreport.get("float_ops", {})
    report.float_prefix_ops = qreport.get("float_prefix_ops", {})
    report.head_feature_scale = qreport.get("feature_scale")
    report.bias_correction = qreport.get("bias_correction")
    report.sigmoid_ranges = qreport.get("sigmoid_ranges")
    if require_full_delegation and not report.fully_delegated:
        outside = ", ".join(f"{op} x{n}" for op, n in sorted(report.ops_outside.items())) or "none"
        raise CheckFailed(f"{meta['model']} {precision} .pte is not fully delegated to XNNPACK: "
                          f"{report.partitions} partition(s); ops left outside: {outside}")
    # 16-byte segment alignment (default 128) trims about 1 KB of padding from tiny models.
    pte = bytes(edge.to_executorch(ExecutorchBackendConfig(segment_alignment=16)).buffer)
    from toolchain.export.xnnpack_graph import float_nodes, op_table, xnnpack_nodes

    nodes = xnnpack_nodes(pte)
    report.xnnpack_ops = op_table(nodes)
    report.xnnpack_float_nodes = float_nodes(nodes) if precision == "int8" else {}
    if require_full_delegation and not report.int8_end_to_end:
        islands = ", ".join(f"{op} x{n}" for op, n in sorted({**report.float_ops,
                                                               **report.xnnpack_float_nodes}.items()))
        raise CheckFailed(f"{meta['model']} int8 .pte leaves ops in float between int8 ops: {islands}")
    return pte, meta, report
