"""A `.tflite` file as LiteRT's flatbuffer object tree: unpacked to edit, packed back to bytes.
Shared by the converter's post-processing and the calibration, which both rewrite files."""

from __future__ import annotations


def load_flatbuffer(buf: bytes):
    """(the schema module, the unpacked ModelT) of a .tflite file's bytes."""
    from ai_edge_litert import schema_py_generated as schema

    return schema, schema.ModelT.InitFromPackedBuf(buf, 0)


def pack_flatbuffer(model, size_hint: int) -> bytes:
    """A ModelT packed back into .tflite bytes (`size_hint`: the expected size, to size the builder)."""
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def op_name(schema, model, op) -> str:
    """The builtin operator name of `op` ("CONV_2D", ...), or "?" for a custom one."""
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    code = model.operatorCodes[op.opcodeIndex]
    return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
