"""Narrow int8 ranges that reach values an int8 sigmoid cannot tell apart.

An int8 sigmoid (XNNPACK's, TFLite's LOGISTIC) writes [0, 1) on the fixed grid of step 1/256
(toolchain.quantize.pt2e.SIGMOID_SCALE): every input below SIGMOID_ZERO (sigmoid < 1/512) gives
exactly 0, and every input above SIGMOID_ONE (sigmoid >= 254.5/256) the top level. So:

- a tensor read only by sigmoids (an SE gate) loses nothing when its range is clipped to
  [SIGMOID_ZERO, SIGMOID_ONE];
- a tensor read only by a SiLU, x * sigmoid(x) (toolchain.export.int8_silu), loses nothing when
  the bottom of its range is clipped to SIGMOID_ZERO: below it the sigmoid writes an exact 0 and
  the int8 multiply an exact 0, whatever x was. The top cannot be clipped (x * 1 is x).

The rest of the range then gets a finer step. On SeesawFaceNet's 48 SiLU inputs the calibrated
ranges reach -4.6 to -18.5 below zero (mse ranges), so the step shrinks to 0.67-1.0 of what it was,
for free: the activations that carry half of that model's int8 error
(benchmarks/bench_activation_ablation.py). Exact in the sense that matters: for a clipped value
the int8 sigmoid writes the level that the unrounded value would give.
"""

from __future__ import annotations

import math

import numpy as np

from toolchain.quantize.fx_nodes import is_plumbing, target_name

# Clip points with a margin beyond the exact boundaries (ln(0.5/255.5) = -6.2364 and
# ln(254.5/1.5) = 5.1338), so a value the new grid rounds down still lands in the flat part.
SIGMOID_ZERO = math.log(0.5 / 255.5) - 0.05
SIGMOID_ONE = math.log(254.5 / 1.5) + 0.05


def affine_qparams(lo: float, hi: float, qmin: int = -128, qmax: int = 127) -> tuple[float, int]:
    """int8 affine (scale, zero_point) of the range [lo, hi], which is widened to hold 0, as
    torchao's observers compute them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / float(qmax - qmin), float(np.finfo(np.float32).eps))
    zero_point = int(np.clip(qmin - round(lo / scale), qmin, qmax))
    return scale, zero_point


def narrowed_range(lo: float, hi: float, readers: str) -> tuple[float, float]:
    """[lo, hi] clipped where the readers ("sigmoid" or "silu") cannot see the difference."""
    if readers == "sigmoid":
        return max(lo, SIGMOID_ZERO), min(hi, SIGMOID_ONE)
    if readers == "silu":
        return max(lo, SIGMOID_ZERO), hi
    raise ValueError(readers)


def _narrowed(scale: float, zp: int, qmin: int, qmax: int, readers: str) -> dict | None:
    """The int8 quantisation (scale, zero_point) narrowed for `readers`, with what it was, as a
    report row; None when the step would not shrink."""
    lo, hi = scale * (qmin - zp), scale * (qmax - zp)
    new_scale, new_zp = affine_qparams(*narrowed_range(lo, hi, readers), qmin, qmax)
    if new_scale >= scale:
        return None
    return {"readers": readers, "range": [lo, hi], "scale": new_scale, "zero_point": new_zp,
            "narrowed": [new_scale * (qmin - new_zp), new_scale * (qmax - new_zp)], "step_ratio": new_scale / scale}


def _is(node, op: str) -> bool:
    return getattr(node, "op", "") == "call_function" and f"aten.{op}." in target_name(node) + "."


def _read_as(readers: list, quantized) -> str | None:
    """How a tensor with these reader nodes is read: "sigmoid" (by sigmoids only), "silu" (by a
    sigmoid and the product of the tensor with that sigmoid) or None. `quantized(node)` gives the
    node a graph's int8 wrapping (quantise/dequantise, fake quantisation) stands for."""
    sigmoids = [r for r in readers if _is(r, "sigmoid")]
    if not sigmoids or len(sigmoids) != len(set(sigmoids)):
        return None
    if len(sigmoids) == len(readers):
        return "sigmoid"
    muls = [r for r in readers if r not in sigmoids]
    if len(sigmoids) == 1 and len(muls) == 1 and _is(muls[0], "mul") and \
            sum(quantized(a) in sigmoids for a in muls[0].args) == 1:
        return "silu"
    return None


def _through_quantize(node):
    while "quantize_per_tensor" in target_name(node):
        node = node.args[0]
    return node


def _readers(q) -> str | None:
    """How the int8 tensor written by quantize node `q` of a converted PT2E graph is read (_read_as)."""
    dqs = list(q.users)
    if not dqs or not all("dequantize_per_tensor" in target_name(d) for d in dqs):
        return None
    return _read_as([u for d in dqs for u in d.users], _through_quantize)


def narrow_sigmoid_ranges(converted) -> list[dict]:
    """Narrow, in a converted PT2E graph (quantize/dequantize nodes with scalar qparams), the
    int8 ranges of tensors read only by sigmoids or by SiLUs (see the module docstring). Returns
    one row per narrowed tensor: {node, readers, range: [lo, hi] before, narrowed: [lo, hi],
    scale, zero_point, step_ratio}; the graph is recompiled when any changed."""
    rows = []
    for q in list(converted.graph.nodes):
        if q.op != "call_function" or "quantize_per_tensor" not in target_name(q) or "dequantize" in target_name(q):
            continue
        scale, zp = q.args[1], q.args[2]
        if not isinstance(scale, float) or not isinstance(zp, int):
            continue
        readers = _readers(q)
        # A reshape's int8 output shares its source's quantisation: left as it is.
        if readers is None or getattr(q.args[0], "op", "") != "call_function" or is_plumbing(q.args[0]):
            continue
        row = _narrowed(scale, zp, int(q.args[3]), int(q.args[4]), readers)
        if row is None:
            continue
        for n in [q, *q.users]:
            n.args = (n.args[0], row["scale"], row["zero_point"], *n.args[3:])
        rows.append({"node": q.args[0].name, **row})
    if rows:
        converted.recompile()
    return rows


def summarize_narrowed(rows: list[dict]) -> dict:
    """What narrow_sigmoid_ranges did, for a report: how many ranges by reader, and the new int8
    step as a fraction of the old one (mean, min)."""
    ratios = [r["step_ratio"] for r in rows]
    out = {"narrowed": len(rows), "by_readers": {k: sum(r["readers"] == k for r in rows)
                                                  for k in sorted({r["readers"] for r in rows})}}
    if ratios:
        out.update(step_ratio_mean=float(np.mean(ratios)), step_ratio_min=float(np.min(ratios)))
    return out


def _is_fake_quant(graph_module, node) -> bool:
    return node.op == "call_module" and "activation_post_process" in str(node.target) and \
        hasattr(graph_module.get_submodule(str(node.target)), "scale")


def narrow_fake_quant_ranges(prepared) -> list[dict]:
    """The same narrowing in a QAT graph (prepare_qat_pt2e) whose activation ranges are
    calibrated and frozen: the fake quantisation of each tensor read only by sigmoids or SiLUs
    gets the narrowed scale and zero point, so QAT trains against the int8 file's grid
    (toolchain.quantize.qat). Returns one row per narrowed tensor, as narrow_sigmoid_ranges."""
    import torch

    def through_fake_quant(node):
        while _is_fake_quant(prepared, node):
            node = node.args[0]
        return node

    rows = []
    for node in prepared.graph.nodes:
        if not _is_fake_quant(prepared, node):
            continue
        fq = prepared.get_submodule(str(node.target))
        if fq.scale.numel() != 1 or "affine" not in str(getattr(fq, "qscheme", "")) or \
                is_plumbing(node.args[0]) or _is(node.args[0], "sigmoid"):
            continue
        readers = _read_as(list(node.users), through_fake_quant)
        if readers is None:
            continue
        row = _narrowed(float(fq.scale), int(fq.zero_point), int(fq.quant_min), int(fq.quant_max), readers)
        if row is None:
            continue
        with torch.no_grad():
            fq.scale.fill_(row["scale"])
            fq.zero_point.fill_(row["zero_point"])
        rows.append({"node": node.args[0].name, **row})
    return rows
