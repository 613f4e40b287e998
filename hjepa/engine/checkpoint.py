"""Checkpoints: written atomically, loaded with weights_only=True, checked for shape.

A checkpoint is a plain dict of tensors and Python primitives (the resolved config is
stored as YAML text), so `torch.load(..., weights_only=True)` reads it without executing
pickled code. `save` stores a SHA-256 of everything in it (every tensor's dtype, shape and
bytes, every other value's repr) under "checksum", and `load` recomputes it: a flipped bit
anywhere is an error naming the file, as is a torn file or one holding NaN or inf.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from hjepa.atomic import atomic_write
from hjepa.errors import CheckpointError

FORMAT = 2  # 1: the same without "checksum" (still read)
MAX_NAMED = 3


def save(state: dict, path: Path) -> None:
    """torch.save `state` with its checksum to `path` atomically: a crash leaves the previous
    file or the new one."""
    state = {**state, "checksum": checksum(state)}
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: Path) -> dict:
    """The checkpoint at `path`, its checksum verified and every tensor finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, disallowed pickled objects
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{path} is not an hjepa checkpoint (format {FORMAT})")
    stored = state.pop("checksum", None)
    if state["format"] == FORMAT and stored != checksum(state):
        raise CheckpointError(f"{path}: checksum mismatch: the file was changed or damaged after it was written")
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise CheckpointError(f"{path} holds non-finite values (NaN or inf) in {', '.join(bad[:MAX_NAMED])}{more}")
    return state


def checksum(state: Any) -> str:
    """SHA-256 of a nested state: keys, every tensor's dtype, shape and bytes, other values' repr."""
    h = hashlib.sha256()
    for name, value in _leaves(state):
        h.update(name.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def non_finite(state: Any) -> list[str]:
    """Names of the floating-point tensors of a nested state that hold NaN or inf."""
    return [name for name, v in _leaves(state)
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _leaves(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from _leaves(state[key], f"{prefix}{key}.")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _leaves(value, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), state


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
