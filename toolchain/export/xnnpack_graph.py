"""What a `.pte`'s XNNPACK delegate really runs: its serialized XNNPACK graph, node by node.

The graph-level checks (toolchain.export.executorch) read PT2E's annotations; this reads the
delegate blob inside the file, as the runtime will, through the flatbuffer schema and `flatc`
that ExecuTorch ships. Every XNNPACK node is listed with the data types of the tensors it
touches, so an int8 file's precision is what its nodes say: a float tensor between two int8
ops shows as a `Convert` to fp32, an fp32 node and a `Convert` back.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from toolchain.errors import ToolchainError

# XNNPACK data types by precision: int8 activations, per-channel int8 weights, int32 biases.
_PRECISION = {"xnn_datatype_qint8": "int8", "xnn_datatype_quint8": "int8", "xnn_datatype_qcint8": "int8",
              "xnn_datatype_qcint32": "int8", "xnn_datatype_qint32": "int8", "xnn_datatype_qdint8": "int8",
              "xnn_datatype_qbint4": "int4", "xnn_datatype_qcint4": "int4",
              "xnn_datatype_fp32": "fp32", "xnn_datatype_fp16": "fp16", "xnn_datatype_bf16": "bf16"}


def _delegate_blobs(pte: bytes) -> list[bytes]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte).program
    blobs = []
    for plan in program.execution_plan:
        for delegate in plan.delegates:
            if delegate.id == "XnnpackBackend":
                blobs.append(bytes(program.backend_delegate_data[delegate.processed.index].data))
    return blobs


def _decode(blob: bytes) -> dict:
    """One XNNPACK delegate blob -> its graph as JSON (xnodes, xvalues, input_ids, output_ids)."""
    import executorch.backends.xnnpack.serialization as serialization
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _get_flatc_path

    header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
    flatbuffer = blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    schema = Path(list(serialization.__path__)[0]) / "schema.fbs"
    with tempfile.TemporaryDirectory(prefix="toolchain-xnngraph-") as tmp:
        (Path(tmp) / "graph.bin").write_bytes(flatbuffer)
        done = subprocess.run([_get_flatc_path(), "--json", "--strict-json", "--raw-binary", "--defaults-json",
                               "-o", tmp, str(schema), "--", str(Path(tmp) / "graph.bin")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ToolchainError(f"cannot decode the XNNPACK graph: flatc: {done.stderr.strip()[:200]}")
        text = (Path(tmp) / "graph.json").read_text()
    # flatc writes unbounded clamps (a ReLU's output_max) as bare inf, which JSON lacks.
    text = re.sub(r"(?<=[:\[,])(\s*)(-?)inf\b", r"\1\2Infinity", text)
    return json.loads(re.sub(r"(?<=[:\[,])(\s*)nan\b", r"\1NaN", text))


def _node_values(node: dict) -> tuple[str, list[int], list[int]]:
    """(type without the XNN prefix, input value ids, output value ids) of one node."""
    body = node["xnode_union"]
    kind = node["xnode_union_type"].removeprefix("XNN")
    outputs = [v for k, v in body.items() if k.startswith("output") and k.endswith("_id")]
    inputs = [v for k, v in body.items() if k.endswith("_id") and not k.startswith("output")]
    inputs += [i for k, ids in body.items() if k.endswith("_ids") and isinstance(ids, list) for i in ids]
    return kind, inputs, outputs


def xnnpack_nodes(pte: bytes) -> list[dict]:
    """Every node of every XNNPACK delegate in the file, in order: {"op", "precision", "edge"}.

    precision: the tensors' precisions joined by "->" where they differ from input to output (a
    Convert: "fp32->int8"), else the one precision ("int8", "fp32"). edge: True for the float
    work at the ends of an int8 file with float input and output: the float ops that read only
    the input (a float prefix, e.g. the verifier's input pooling), the Convert from there to int8,
    and the Convert that writes the output."""
    nodes = []
    for blob in _delegate_blobs(pte):
        graph = _decode(blob)
        dtypes = {}
        for value in graph["xvalues"]:
            tensor = value["xvalue_union"].get("tensor_value", value["xvalue_union"])
            dtypes[tensor["id_out"]] = _PRECISION.get(tensor["datatype"], tensor["datatype"])
        produced = {i for node in graph["xnodes"] for i in _node_values(node)[2]}
        from_input = set(graph.get("input_ids", []))  # float values computed from the input alone
        outputs = set(graph.get("output_ids", []))
        for node in graph["xnodes"]:
            kind, ins, outs = _node_values(node)
            in_types = sorted({dtypes[i] for i in ins if i in dtypes})
            out_types = sorted({dtypes[i] for i in outs if i in dtypes})
            precision = "/".join(out_types) if in_types in ([], out_types) else \
                f"{'/'.join(in_types)}->{'/'.join(out_types)}"
            reads_input_only = all(i in from_input for i in ins if i in produced or i in from_input)
            edge = (reads_input_only and "int8" not in in_types) or (kind == "Convert" and bool(outputs & set(outs)))
            if edge and precision == "fp32":
                from_input.update(outs)
            nodes.append({"op": kind, "precision": precision, "edge": edge})
    return nodes


def op_table(nodes: list[dict]) -> dict[str, int]:
    """{"op precision": count}, e.g. {"Conv2d int8": 62, "Convert fp32->int8": 1}."""
    return dict(sorted(Counter(f"{n['op']} {n['precision']}" for n in nodes).items()))


def float_nodes(nodes: list[dict]) -> dict[str, int]:
    """The nodes of an int8 file that touch a float tensor, less its float ends (see
    xnnpack_nodes): {"op precision": count}; empty when the file is int8 end to end."""
    return op_table([n for n in nodes if "fp" in n["precision"] and not n["edge"]])
