"""PT2E static int8 for XNNPACK: export, insert observers, calibrate, convert.

Weights are symmetric per-channel int8, activations per-tensor int8 (XNNPACK's native scheme).
The converted module keeps quantize/dequantize pairs that the XNNPACK partitioner folds into
int8 kernels; ops the quantizer does not annotate (e.g. PReLU) stay in float between them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from toolchain.runtime.preprocess import model_input


def calibration_batches(images: np.ndarray, mean, std, batch: int = 16):
    for i in range(0, len(images), batch):
        yield torch.from_numpy(model_input(images[i:i + batch], mean, std))


# Graph nodes that compute nothing (shape plumbing, tuple access) are not "left in float".
_PLUMBING = ("getitem", "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "contiguous",
             "clone", "_assert", "sym_size", "dropout", "detach", "alias")


def float_ops(prepared: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Compute ops the quantizer did not annotate, as (inside, prefix).

    inside: fed by an int8 tensor (an observed output), so int8 is dequantised around them
    (e.g. PReLU): float islands in an int8 model. prefix: they read the float input before
    the first quantise (e.g. the verifier's input avg-pool), which a float-input .pte expects.
    """
    inside: dict[str, int] = {}
    prefix: dict[str, int] = {}

    def observed(arg) -> bool:
        return getattr(arg, "op", "") == "call_module" and "activation_post_process" in str(arg.target)

    for n in prepared.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if any(p in name for p in _PLUMBING) or "quantize" in name:
            continue
        ann = n.meta.get("quantization_annotation")
        if ann is None or not getattr(ann, "_annotated", True):
            args = [a for a in n.all_input_nodes]
            target = inside if any(observed(a) for a in args) else prefix
            target[name] = target.get(name, 0) + 1
    return inside, prefix


def quantize_xnnpack_int8(model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
                          mean, std, report: dict | None = None) -> nn.Module:
    """Return the converted (fake-quantized) graph module, ready for a second torch.export.
    If `report` is a dict, it receives `float_ops` and `float_prefix_ops` (see float_ops())."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # Calibrate at the batch size of the export (1), so batch-dependent shapes stay static.
    graph = torch.export.export(model.eval(), (example,), strict=False).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    if report is not None:
        report["float_ops"], report["float_prefix_ops"] = float_ops(prepared)
    with torch.no_grad():
        for x in calibration_batches(calibration, mean, std, batch=1):
            prepared(x)
    return convert_pt2e(prepared)
