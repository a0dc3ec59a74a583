"""What a node of an exported (torch.fx) graph does, as the int8 passes need to know it."""

from __future__ import annotations

# Graph nodes that compute nothing (shape plumbing, tuple access): their int8 output keeps the
# quantisation of their input, and a float one is not "left in float".
PLUMBING = ("getitem", "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "contiguous",
            "clone", "_assert", "sym_size", "dropout", "detach", "alias")


def target_name(node) -> str:
    """The op a node calls, as a string ("aten.conv2d.default", ...; "" for none)."""
    return str(getattr(node, "target", ""))


def is_plumbing(node) -> bool:
    """Does `node` only move or reshape values (see PLUMBING)?"""
    return getattr(node, "op", "") == "call_function" and \
        any(p in getattr(node.target, "__name__", str(node.target)) for p in PLUMBING)
