"""Read a TFLite flatbuffer and say whether it is int8 end to end, without trusting its name.

Checked on the file itself (ai_edge_litert's copy of the TFLite schema):
- the subgraph's inputs and outputs are INT8 with a scale and zero-point;
- every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED has INT8 weights quantised per output
  channel (one scale per channel along the quantised dimension) and INT32 biases;
- no operator reads or writes a float tensor (a QUANTIZE/DEQUANTIZE island would show here).
It also lists the operators LiteRT's XNNPACK delegate does not run in int8 (PReLU is the known
case: the graph splits and int8 becomes slower than float) so reports can show them.
A mixed file (the fallback's float units, `*_int8_mixed.tflite`) is checked the same way, but
its float ops are counted rather than refused; it is never reported as int8.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Kernels whose weights must be per-channel int8 in a model called int8.
_WEIGHTED = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
# int8 ops present in the file that LiteRT's XNNPACK delegate leaves to the reference kernels.
XNNPACK_INT8_UNSUPPORTED = {"PRELU"}
_FLOAT_TYPES = {"FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16"}


@dataclass
class TfliteReport:
    input_type: str
    output_type: str
    input_shape: list[int]
    output_shape: list[int]
    input_quant: dict | None
    output_quant: dict | None
    ops: dict[str, int]
    problems: list[str] = field(default_factory=list)
    xnnpack_unsupported: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)  # allowed float ops of a mixed file, by op

    @property
    def is_int8(self) -> bool:
        return not self.problems and not self.float_ops

    def summary(self) -> str:
        """The problems in one line: ops with float tensors counted by op, then the rest."""
        floats = Counter(p.split(" has float tensors")[0] for p in self.problems if " has float tensors" in p)
        rest = [p for p in self.problems if " has float tensors" not in p]
        parts = ([("float tensors in " + ", ".join(f"{k} x{v}" for k, v in floats.most_common()))] if floats else [])
        return "; ".join(parts + rest[:3])

    def to_dict(self) -> dict:
        return {"is_int8": self.is_int8, "input_type": self.input_type, "output_type": self.output_type,
                "input_shape": self.input_shape, "output_shape": self.output_shape,
                "input_quant": self.input_quant, "output_quant": self.output_quant, "ops": self.ops,
                "problems": self.problems, "xnnpack_unsupported": self.xnnpack_unsupported,
                **({"float_ops": self.float_ops} if self.float_ops else {})}


def _names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def _quant(t) -> dict | None:
    q = t.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    if len(q.scale) == 1:
        return {"scale": float(q.scale[0]), "zero_point": int(q.zeroPoint[0])}
    return {"scales": len(q.scale), "dimension": int(q.quantizedDimension)}


def _name(t) -> str:
    n = t.name
    return n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)


def inspect_tflite(buf: bytes, allow_float_ops: bool = False) -> TfliteReport:
    """The file's report. `allow_float_ops`: the file is a mixed one (the fallback's, int8 input
    and output): ops with float tensors are counted in `float_ops`, not reported as problems."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    tnames, onames = _names(schema.TensorType), _names(schema.BuiltinOperator)
    sub = model.subgraphs[0]
    problems: list[str] = []
    if len(model.subgraphs) != 1:
        problems.append(f"{len(model.subgraphs)} subgraphs (expected 1)")
    tin, tout = sub.tensors[sub.inputs[0]], sub.tensors[sub.outputs[0]]
    ops: Counter = Counter()
    float_ops: Counter = Counter()
    for io, t in (("input", tin), ("output", tout)):
        if tnames[t.type] != "INT8":
            problems.append(f"{io} tensor {_name(t)!r} is {tnames[t.type]}, not INT8")
        elif _quant(t) is None:
            problems.append(f"{io} tensor {_name(t)!r} has no scale/zero-point")
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = onames.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        ops[name] += 1
        idx = [i for i in list(op.inputs) + list(op.outputs) if i >= 0]
        floats = [_name(sub.tensors[i]) for i in idx if tnames[sub.tensors[i].type] in _FLOAT_TYPES]
        if floats and allow_float_ops:
            float_ops[name] += 1
            continue
        if floats:
            problems.append(f"{name} has float tensors: {', '.join(floats[:3])}")
        if name in _WEIGHTED and len(op.inputs) > 1:
            w = sub.tensors[op.inputs[1]]
            if tnames[w.type] != "INT8":
                problems.append(f"{name} weight {_name(w)!r} is {tnames[w.type]}")
                continue
            q = w.quantization
            shape = list(w.shape)
            n_scales = 0 if q is None or q.scale is None else len(q.scale)
            dim = _WEIGHTED[name]
            channels = shape[dim] if len(shape) > dim else 1
            if q is None or n_scales != channels or (channels > 1 and q.quantizedDimension != dim):
                problems.append(f"{name} weight {_name(w)!r} is not per-channel "
                                f"({n_scales} scale(s) for {channels} channels)")
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                b = sub.tensors[op.inputs[2]]
                if tnames[b.type] != "INT32":
                    problems.append(f"{name} bias {_name(b)!r} is {tnames[b.type]}, not INT32")
    # Only an int8 file can have ops XNNPACK refuses *in int8*; a float file runs them in float.
    int8_io = tnames[tin.type] == "INT8" and tnames[tout.type] == "INT8"
    unsupported = {k: v for k, v in ops.items() if k in XNNPACK_INT8_UNSUPPORTED} if int8_io else {}
    return TfliteReport(input_type=tnames[tin.type], output_type=tnames[tout.type],
                        input_shape=[int(s) for s in np.asarray(tin.shape)],
                        output_shape=[int(s) for s in np.asarray(tout.shape)],
                        input_quant=_quant(tin), output_quant=_quant(tout), ops=dict(ops),
                        problems=problems, xnnpack_unsupported=unsupported, float_ops=dict(float_ops))
