"""Checkpoints: written atomically, loaded with weights_only=True, checked for shape.

A checkpoint is a plain dict of tensors and Python primitives (the resolved config is
stored as YAML text), so `torch.load(..., weights_only=True)` reads it without executing
pickled code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hjepa.atomic import atomic_write
from hjepa.errors import CheckpointError

FORMAT = 1


def save(state: dict, path: Path) -> None:
    """torch.save `state` to `path` atomically: a crash leaves the previous file or the new one."""
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, disallowed pickled objects
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hjepa checkpoint (format {FORMAT})")
    return state


def check_compatible(model_state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from `model`'s."""
    own = model.state_dict()
    missing = sorted(set(own) - set(model_state))
    unexpected = sorted(set(model_state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(model_state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in model_state and tuple(model_state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} was saved from a different model shape:"]
        for title, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                lines.append(f"  {title}: " + "; ".join(items[:3]) + more)
        lines.append("  train with the model config it was saved with (see its config), or start a new run directory")
        raise CheckpointError("\n".join(lines))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
