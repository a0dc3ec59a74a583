"""Saving and loading float models: the hand-off between training, enrollment and export.

Two on-disk forms, both loadable with `torch.load(weights_only=True)` (no pickled code):
- a checkpoint `.pt`: {"model": name, "model_kwargs": {...}, "state_dict": {...}, **extra};
- an enrolled user folder: `verifier.pt` (a plain state dict of the `verifier` model) beside
  `enrollment.json` ({"model": "verifier", "model_kwargs": {...}, "threshold": ..., ...}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.atomic import atomic_write_bytes
from toolchain.errors import ToolchainError
from toolchain.models.registry import build_model

ENROLLMENT_JSON = "enrollment.json"
VERIFIER_WEIGHTS = "verifier.pt"


def save_checkpoint(path: str | Path, model_name: str, model_kwargs: dict, state_dict: dict,
                    **extra: Any) -> None:
    payload = {"model": model_name, "model_kwargs": dict(model_kwargs),
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, **extra}
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def load_state(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or unsafe file: one line
        # torch's UnpicklingError advises weights_only=False, which would run the file's code:
        # never the advice for a file this tool cannot trust, so only the error's kind is kept.
        why = type(exc).__name__ if "weights_only" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise ToolchainError(f"{path}: not a loadable weights file ({why})".splitlines()[0]) from exc


def save_enrollment(out_dir: str | Path, model: nn.Module, model_kwargs: dict, threshold: float,
                    **info: Any) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / VERIFIER_WEIGHTS, lambda tmp: torch.save(state, tmp))
    meta = {"model": "verifier", "model_kwargs": dict(model_kwargs), "threshold": float(threshold), **info}
    atomic_write_bytes(out_dir / ENROLLMENT_JSON,
                       lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return out_dir


def load_model(source: str | Path) -> tuple[nn.Module, dict]:
    """Build a float model in eval mode from a checkpoint `.pt` or an enrolled user folder.

    Returns (model, meta); meta holds "model", "model_kwargs" and any extras such as "threshold".
    """
    source = Path(source)
    if source.is_dir():
        meta_path = source / ENROLLMENT_JSON
        if not meta_path.is_file():
            raise ToolchainError(f"{source}: not an enrolled user folder (no {ENROLLMENT_JSON})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ToolchainError(f"{meta_path}: invalid JSON ({exc})") from exc
        state = load_state(source / VERIFIER_WEIGHTS)
    else:
        payload = load_state(source)
        if not isinstance(payload, dict) or "model" not in payload or "state_dict" not in payload:
            raise ToolchainError(f"{source}: not a toolchain checkpoint (needs 'model' and 'state_dict')")
        state = payload["state_dict"]
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
    model = build_model(meta["model"], **meta.get("model_kwargs", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ToolchainError(f"{source}: weights do not fit model {meta['model']!r}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), meta
