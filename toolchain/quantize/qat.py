"""Quantization-aware fine-tuning (PT2E QAT) that pulls an int8 model back onto its float one.

Each BatchNorm2d after a conv is first folded into it from its running statistics, as the int8
files fold it. The model is exported, `prepare_qat_pt2e` inserts fake quantisation with
ExecuTorch's XNNPACK scheme (per-channel symmetric weights, per-tensor activations), and each
activation's range is set by the export's own calibration method and then frozen. The weights
train for `steps` steps to reproduce the float model's embeddings: the loss is
1 - cosine(fake-quantised embedding, float embedding) on the recipe's identity images, randomly
mirrored. No labels are needed, and the target is exactly what the parity bounds measure.

The tuned weights go back into the folded copy of the eager model (the exported graph keeps the
model's parameter names), so each runtime's int8 path then quantises them with the recipe's
calibration method: PT2E for the `.pte`, the TFLite converter for onnx2tf's `.tflite`. The float
reference of parity stays the original model.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.quantize.batchnorm import fold_batchnorm
from toolchain.quantize.saturation import narrow_fake_quant_ranges
from toolchain.runtime.preprocess import model_input


def _qat_quantizer(int8):
    """XNNPACK's QAT scheme, except that each activation's fake quantisation takes its range from
    the export's own calibration observer (int8.calibration), not a moving min-max: QAT then
    trains against the ranges the int8 file will have. Measured on the recipe's MobileFaceNet:
    150 steps with moving min-max ranges raised the fake-quantised cosine 0.99738 -> 0.99835,
    and the exported int8 graph, recalibrated, kept none of it (0.99840 before, 0.99832 after)."""
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize

    from toolchain.quantize.int8_options import with_calibration
    from toolchain.quantize.pt2e import annotate_prelu, annotate_sigmoid

    ptq = with_calibration(get_symmetric_quantization_config(is_per_channel=True), int8)
    qat = get_symmetric_quantization_config(is_per_channel=True, is_qat=True)

    def calibrated(spec, like):
        if spec is None or like is None:
            return spec
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=like.observer_or_fake_quant_ctr))

    config = dataclasses.replace(qat, input_activation=calibrated(qat.input_activation, ptq.input_activation),
                                 output_activation=calibrated(qat.output_activation, ptq.output_activation))

    class WithInt8PReLU(XNNPACKQuantizer):
        """PReLUs and sigmoids fake-quantised as the .pte runs them (toolchain.quantize.pt2e:
        annotate_prelu, annotate_sigmoid on the fixed output grid)."""

        def annotate(self, model):
            model = super().annotate(model)
            for n in model.graph.nodes:
                if n.op == "call_function" and n.target == torch.ops.aten.prelu.default:
                    annotate_prelu(n, config.input_activation, config.output_activation, qat=True)
                if n.op == "call_function" and n.target == torch.ops.aten.sigmoid.default and \
                        n.meta.get("quantization_annotation") is None:
                    annotate_sigmoid(n, config.input_activation)
            return model

    return WithInt8PReLU().set_global(config)


def _is_weight(fake_quant) -> bool:
    # XNNPACK: weights per-channel symmetric, PReLU slopes per-tensor symmetric, activations affine
    return "symmetric" in str(getattr(fake_quant, "qscheme", ""))


def qat_finetune(model: nn.Module, images: np.ndarray, mean, std, *, steps: int, lr: float = 1e-5,
                 batch: int = 16, seed: int = 0, calibration: np.ndarray | None = None, int8=None,
                 progress: bool = True) -> tuple[nn.Module, dict]:
    """A copy of `model` fine-tuned under int8 fake quantisation towards `model`'s own outputs.

    images: uint8 NHWC identity images; calibration: uint8 NHWC images that set the activation
    ranges (default: `images`), with the method of `int8` (Int8Options; default mse), frozen
    while the weights train. Returns (tuned model, report) where the report holds the steps,
    the first and last losses, and the mean embedding cosine to float before and after.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from toolchain.console import progress_bar
    from toolchain.quantize.int8_options import Int8Options
    from toolchain.quantize.pt2e import calibration_batches

    if steps < 1:
        raise ToolchainError(f"QAT needs at least one step, got {steps}")
    if len(images) < 2:
        raise ToolchainError(f"QAT needs identity images to train on, got {len(images)}")
    batch = min(batch, len(images))
    teacher = model.eval()
    student, folds = fold_batchnorm(model)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    def draw() -> torch.Tensor:
        pick = images[rng.choice(len(images), batch, replace=False)]
        flip = rng.random(batch) < 0.5
        pick = np.where(flip[:, None, None, None], pick[:, :, ::-1], pick)
        return torch.from_numpy(model_input(np.ascontiguousarray(pick), mean, std))

    held_out = draw()  # a fixed batch: cosine before and after, on images drawn like the training ones
    # A fixed batch size keeps every shape static, as in the exported file.
    graph = torch.export.export(student, (held_out,), strict=False).module()
    # NCHW: NHWC measured slower here (one MobileFaceNet step, batch 8, one thread: 6.3 s vs 4.8 s).
    prepared = prepare_qat_pt2e(graph, _qat_quantizer(Int8Options.from_any(int8)))
    # prepare_qat_pt2e leaves any BatchNorm not folded above (e.g. a BatchNorm1d head) in
    # training mode: batch statistics, and running ones overwritten. The int8 file folds the
    # running statistics, so QAT keeps them (measured before folding existed: cosine to float
    # 0.61 in training mode against 0.998 in eval mode, on the recipe's MobileFaceNet at step 0).
    move_exported_model_to_eval(prepared)
    fake_quants = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    # Calibrate as the export does (float activations into each observer), then freeze the
    # activation ranges; the weights' ranges follow the weights.
    with torch.no_grad():
        for m in fake_quants:
            m.disable_fake_quant()
        calib = images if calibration is None else calibration
        calib = np.concatenate([calib] * -(-batch // len(calib)))  # at least one full batch
        for x in calibration_batches(calib, mean, std, batch=batch):
            if len(x) == batch:  # the graph's batch size is static
                prepared(x)
        for m in fake_quants:
            m.enable_fake_quant()
            if not _is_weight(m):
                m.disable_observer()
        narrowed = narrow_fake_quant_ranges(prepared)  # the int8 file's grid (toolchain.quantize.saturation)
    with torch.no_grad():
        target = teacher(held_out)
    params = [p for p in prepared.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)

    def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cosine_similarity(x.flatten(1), y.flatten(1), dim=1)

    with torch.no_grad():
        before = float(cosine(prepared(held_out), target).mean())
    losses = []
    with progress_bar("QAT (int8 fake quantisation)", steps, enabled=progress) as advance:
        for _ in range(steps):
            x = draw()
            with torch.no_grad():
                t = teacher(x)
            loss = (1.0 - cosine(prepared(x), t)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            advance(1, loss=losses[-1])
    with torch.no_grad():
        after = float(cosine(prepared(held_out), target).mean())

    # The exported graph keeps the eager model's names; only BatchNorm's step counters are absent.
    tuned_state = prepared.state_dict()
    state = student.state_dict()
    missing = [k for k in state if k not in tuned_state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ToolchainError(f"QAT: the trained graph lacks the model's tensors {missing[:3]}")
    student.load_state_dict({k: tuned_state.get(k, v) for k, v in state.items()})
    # The exporters expect the default memory layout (XNNPACK's lowering refuses a mix).
    student = student.to(memory_format=torch.contiguous_format)
    report = {"batchnorm_folded": folds, "steps": steps, "lr": lr, "batch": batch, "loss_first": losses[0],
              "loss_last": losses[-1], "fake_quant_cosine_before": before, "fake_quant_cosine_after": after,
              "sigmoid_ranges_narrowed": len(narrowed)}
    return student.eval(), report
