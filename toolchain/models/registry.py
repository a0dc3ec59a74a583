"""Model registry: every zoo model states its input, normalisation and output.

A family registers a builder with `@register_model(...)`; `build_model(name, **kw)` builds it
and attaches its `ModelSpec` as `model.spec`, so exporters and runners never guess the layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from torch import nn

from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: tuple[int, int, int] = (3, 112, 112)  # C, H, W; the standard aligned face crop
    # Per-channel normalisation applied to x/255: (x/255 - mean) / std. Insightface: 0.5 / 0.5.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    output: str = "embedding"  # "embedding" or "logit"
    output_dim: int = 512
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("defaults")
        return d


_REGISTRY: dict[str, tuple[ModelSpec, Callable[..., nn.Module]]] = {}


def register_model(name: str, **spec_kw) -> Callable:
    """Decorator: register `builder(**kw) -> nn.Module` under `name` with its spec."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = (ModelSpec(name=name, **spec_kw), builder)
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ToolchainError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name][0]


def build_model(name: str, **kw) -> nn.Module:
    spec = get_spec(name)
    _, builder = _REGISTRY[name]
    try:
        model = builder(**kw)
    except TypeError as exc:  # an argument this model does not take, e.g. embedding_size for the verifier
        raise ToolchainError(f"model {name!r}: {exc}") from exc
    # A builder argument such as embedding_size may change the output width: the spec follows.
    output_dim = getattr(model, "output_dim", None)
    if isinstance(output_dim, int) and output_dim != spec.output_dim:
        spec = replace(spec, output_dim=output_dim)
    model.spec = spec
    return model
