"""The per-step computation of training, shared by the Trainer's loop and
`python -m hjepa.bench step`, so that the benchmark times exactly the code that trains.

Nothing here reads a value back from the device: no ``.item()``, no ``.cpu()``, no Python
branch on a tensor's value, no op whose output shape depends on data (``nonzero``,
``bincount`` on the device, boolean indexing). Host<->device waits happen only where the
Trainer logs or checkpoints (tests/test_step.py checks this by recording every op of a
step). With bf16 or fp32 the GradScaler is disabled, so ``scaler.scale`` and
``scaler.step`` are plain pass-throughs.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn



def forward_backward(step_model: nn.Module, images: Tensor, context: Tensor, targets: Tensor,
                     autocast: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler,
                     grad_accum: int = 1) -> dict[str, Tensor]:
    """Target forward (no grad) + context encoder + predictor + loss under `autocast`, then
    backward of loss / grad_accum (gradients accumulate). Returns the model's output dict."""
    with autocast:
        out = step_model(images, context, targets)
    scaler.scale(out["loss"] / grad_accum).backward()
    return out


def optimizer_update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     clip_grad: Optional[float], momentum: float) -> None:
    """Optional clipping, the optimizer step (fused AdamW on CUDA), clearing the gradients,
    and the EMA of the target encoder (one foreach lerp over all its tensors)."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    model.update_target(momentum)
