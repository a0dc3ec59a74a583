"""Parameters and multiply-adds of a PyTorch model, with fvcore and explicit op handlers.

Convention (also returned in every profile as `convention`):

- `macs`: multiply-adds of convolutions (grouped/depthwise included), linear layers and matrix
  products, plus pooling windows. This is how the papers of the zoo count (MobileFaceNet,
  SeesawFaceNet, VarGFaceNet report conv + linear multiply-adds); pooling is added so that an
  in-graph resize (the verifier's 2x2 avg-pool on the 112x112 crop) counts against a budget. A
  pooling window is counted like a depthwise conv with a fixed kernel: kh*kw per output
  element for avg/max pooling, one per input element for adaptive (global) pooling. Pooling
  is a few tenths of a percent of a backbone's total, reported separately in `macs_by_op`.
- `flops` = 2 x `macs`, always (one multiply-add = two FLOPs). fvcore's own "flop" is one
  multiply-add; its totals are our `macs`, never our `flops`.
- `elementwise_ops`: one op per output element of activations (ReLU, PReLU, sigmoid, SiLU,
  hardswish, ...), elementwise add/sub/mul/div (residual adds, the SE scale) and BatchNorm;
  one per input element of reductions (mean, sum, norm). Reported, not part of `macs`:
  the papers leave them out, and BatchNorm folds into the preceding conv at export.
- Pure data movement (view, reshape, transpose, slice, cat, flatten, ...) costs nothing; that
  list is fvcore's. Any other op without a handler is listed in `unsupported_ops` with its
  number of calls, and counted as zero: a profile with unsupported ops is a lower bound.
- `params`: elements of every nn.Parameter (buffers such as BN running stats excluded).
"""

from __future__ import annotations

from collections import Counter
from math import prod
from typing import Any

from toolchain.errors import ToolchainError

CONVENTION = {
    "macs": "multiply-adds of conv, linear and matmul, plus pooling windows (kh*kw per output "
    "element; adaptive pooling one per input element); BatchNorm and elementwise ops excluded",
    "flops": "2 x macs",
    "elementwise_ops": "one per output element of activations, add/sub/mul/div and BatchNorm "
    "(folds into conv at export); one per input element of reductions; not in macs",
    "params": "elements of all nn.Parameters; buffers excluded",
    "tool": "fvcore FlopCountAnalysis with toolchain.profile.counting handlers "
    "(fvcore counts 1 multiply-add as 1 'flop')",
}

# Operator keys (fvcore's simplified op names) whose count is multiply-adds. Everything else a
# handler counts is an elementwise op.
MAC_OPS = frozenset(
    {
        "conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum",
        "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d",
    }
)  # fmt: skip

# One op per output element.
_ELEMENTWISE_OUT = (
    "batch_norm", "layer_norm", "group_norm", "instance_norm",
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "gelu", "prelu", "_prelu_kernel", "sigmoid", "sigmoid_", "silu", "silu_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "tanh", "tanh_", "mish",
    "clamp", "clamp_", "clamp_min", "clamp_max", "softmax", "log_softmax",
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_",
    "sqrt", "rsqrt", "exp", "pow", "neg", "abs",
)  # fmt: skip
# One op per input element (reductions).
_ELEMENTWISE_IN = ("mean", "sum", "norm", "linalg_vector_norm", "frobenius_norm")
_POOL_WINDOW = ("avg_pool1d", "avg_pool2d", "avg_pool3d",
                "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices")  # fmt: skip
_POOL_GLOBAL = ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                "adaptive_max_pool1d", "adaptive_max_pool2d")  # fmt: skip


def _shape(value: Any) -> list[int] | None:
    try:
        if value.isCompleteTensor():
            return list(value.type().sizes())
    except (AttributeError, RuntimeError):
        pass
    return None


def _numel(value: Any) -> int:
    shape = _shape(value)
    return prod(shape) if shape is not None else 0


def _out_elements(key: str):
    def handle(inputs: list, outputs: list) -> Counter:
        return Counter({key: _numel(outputs[0])})

    return handle


def _in_elements(key: str):
    def handle(inputs: list, outputs: list) -> Counter:
        return Counter({key: _numel(inputs[0])})

    return handle


def _int_list(value: Any) -> list[int]:
    """A traced int-list argument: a constant, or a prim::ListConstruct of constants."""
    iv = value.toIValue()
    if iv is None and value.node().kind() == "prim::ListConstruct":
        iv = [v.toIValue() for v in value.node().inputs()]
    if isinstance(iv, int):
        return [iv]
    if iv is None or any(not isinstance(v, int) for v in iv):
        raise ValueError(f"cannot read an int list from {value}")
    return list(iv)


def _pool_window(key: str):
    def handle(inputs: list, outputs: list) -> Counter:
        kernel = _int_list(inputs[1])  # kernel_size, in every pooling signature
        return Counter({key: _numel(outputs[0]) * prod(kernel)})

    return handle


def _handles() -> dict:
    from fvcore.nn.jit_handles import (
        addmm_flop_jit,
        bmm_flop_jit,
        conv_flop_jit,
        einsum_flop_jit,
        linear_flop_jit,
        matmul_flop_jit,
    )

    handles = {
        "aten::_convolution": conv_flop_jit,
        "aten::addmm": addmm_flop_jit,
        "aten::linear": linear_flop_jit,
        "aten::matmul": matmul_flop_jit,
        "aten::mm": matmul_flop_jit,
        "aten::bmm": bmm_flop_jit,
        "aten::einsum": einsum_flop_jit,
    }
    for op in _ELEMENTWISE_OUT:
        handles[f"aten::{op}"] = _out_elements(op.rstrip("_") or op)
    for op in _ELEMENTWISE_IN:
        handles[f"aten::{op}"] = _in_elements(op)
    for op in _POOL_WINDOW:
        handles[f"aten::{op}"] = _pool_window(op)
    for op in _POOL_GLOBAL:
        handles[f"aten::{op}"] = _in_elements(op)
    return handles


def _resolve(model_or_name: Any):
    """(model, name) from a registry name or an nn.Module."""
    from torch import nn

    from toolchain.models import build_model

    if isinstance(model_or_name, str):
        return build_model(model_or_name), model_or_name
    if isinstance(model_or_name, nn.Module):
        spec = getattr(model_or_name, "spec", None)
        return model_or_name, (spec.name if spec is not None else type(model_or_name).__name__)
    raise ToolchainError(f"cannot profile a {type(model_or_name).__name__}; give a model name")


def _input_shape(model: Any, input_size: Any) -> tuple[int, int, int, int]:
    spec = getattr(model, "spec", None)
    chw = tuple(spec.input_size) if spec is not None else (3, 112, 112)
    if input_size is None:
        pass
    elif isinstance(input_size, int):
        chw = (chw[0], input_size, input_size)
    elif len(tuple(input_size)) == 3:
        chw = tuple(int(v) for v in input_size)
    else:
        raise ToolchainError(f"input size {input_size!r}: give N or (C, H, W)")
    if min(chw) < 1:
        raise ToolchainError(f"input size {chw} must be positive")
    return (1, *chw)


def _analyse(model_or_name: Any, input_size: Any = None):
    import torch
    from fvcore.nn import FlopCountAnalysis, parameter_count

    model, name = _resolve(model_or_name)
    shape = _input_shape(model, input_size)
    was_training = model.training
    model.eval()  # BatchNorm in inference mode, as exported
    try:
        x = torch.zeros(shape)
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, (x,))
            analysis.set_op_handle(**_handles())
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            try:
                analysis.total()  # trace and count now, inside no_grad
            except Exception:
                # A wrong input size is the user's error (exit 2); anything else is ours.
                try:
                    model(x)
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise ToolchainError(
                        f"model {name!r} does not run on input {list(shape)}: {reason}"
                    ) from exc
                raise
        params = parameter_count(model)
    finally:
        model.train(was_training)
    return model, name, shape, analysis, params


def _split(counter: Counter) -> tuple[dict[str, int], dict[str, int]]:
    macs = {k: int(v) for k, v in sorted(counter.items()) if k in MAC_OPS and v}
    elem = {k: int(v) for k, v in sorted(counter.items()) if k not in MAC_OPS and v}
    return macs, elem


def profile_model(model_or_name: Any, input_size: Any = None) -> dict:
    """Profile a registered model (by name) or an nn.Module on one input of batch 1.

    `input_size`: None (the model's spec, else 3x112x112), N (C x N x N) or (C, H, W).
    Returns a dict with `model`, `input_shape`, `params`, `macs`, `flops` (= 2 * macs),
    `elementwise_ops`, `macs_by_op`, `elementwise_by_op`, `unsupported_ops` (op -> calls),
    `convention`, and `spec` when the model has one.
    """
    return _summary(*_analyse(model_or_name, input_size))


def profile_with_layers(
    model_or_name: Any, input_size: Any = None, max_depth: int = 2
) -> tuple[dict, list[dict]]:
    """`profile_model` and `layer_breakdown` from a single trace."""
    model, name, shape, analysis, params = _analyse(model_or_name, input_size)
    summary = _summary(model, name, shape, analysis, params)
    return summary, _layers(model, analysis, params, max_depth)


def _summary(model, name, shape, analysis, params) -> dict:
    macs_by_op, elem_by_op = _split(analysis.by_operator())
    macs = sum(macs_by_op.values())
    result = {
        "model": name,
        "input_shape": list(shape),
        "params": int(params.get("", 0)),
        "macs": int(macs),
        "flops": 2 * int(macs),
        "elementwise_ops": int(sum(elem_by_op.values())),
        "macs_by_op": macs_by_op,
        "elementwise_by_op": elem_by_op,
        "unsupported_ops": {k: int(v) for k, v in sorted(analysis.unsupported_ops().items())},
        "convention": dict(CONVENTION),
    }
    spec = getattr(model, "spec", None)
    if spec is not None:
        result["spec"] = spec.to_dict()
    return result


def layer_breakdown(model_or_name: Any, input_size: Any = None, max_depth: int = 2) -> list[dict]:
    """Per-module rows (pre-order, modules up to `max_depth` levels below the root).

    Each row: `module` (dotted name; "" is the whole model), `type`, `depth`, `params`,
    `macs`, `flops`, `elementwise_ops`, `unsupported_ops`. Counts include sub-modules.
    """
    model, _, _, analysis, params = _analyse(model_or_name, input_size)
    return _layers(model, analysis, params, max_depth)


def _layers(model, analysis, params, max_depth: int) -> list[dict]:
    by_module = analysis.by_module_and_operator()
    rows = []
    for name, module in model.named_modules():
        depth = 0 if name == "" else name.count(".") + 1
        if depth > max_depth:
            continue
        macs_by_op, elem_by_op = _split(by_module.get(name, Counter()))
        macs = int(sum(macs_by_op.values()))
        rows.append(
            {
                "module": name,
                "type": type(module).__name__,
                "depth": depth,
                "params": int(params.get(name, 0)),
                "macs": macs,
                "flops": 2 * macs,
                "elementwise_ops": int(sum(elem_by_op.values())),
                "unsupported_ops": {k: int(v) for k, v in analysis.unsupported_ops(name).items()},
            }
        )
    return rows
