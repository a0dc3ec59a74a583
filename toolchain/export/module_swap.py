"""Swap modules of a model for others, on a copy: the int8 artifacts' rewrites share this walk."""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn


def replace_modules(model: nn.Module, match: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> nn.Module | None:
    """A copy of `model` (eval mode) with every module `match` accepts replaced by `make(module)`,
    or None when none matches; the original is untouched."""
    if not any(match(m) for m in model.modules()):
        return None
    rewritten = copy.deepcopy(model)

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if match(child):
                setattr(parent, name, make(child))
            else:
                visit(child)

    visit(rewritten)
    return rewritten.eval()
