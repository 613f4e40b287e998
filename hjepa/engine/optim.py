"""AdamW with the I-JEPA schedules: lr warmup + cosine, weight decay cosine, EMA linear."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn

from hjepa.engine.schedules import cosine, linear, warmup_cosine
from hjepa.errors import ConfigError


class Optimization:
    """Optimizer settings and the three schedules.

    lr values are for `ref_batch_size` images per optimizer step; with `lr_scaling`
    linear or sqrt they are multiplied by (global batch / ref_batch_size) or its square
    root, so the rule that maps batch size to learning rate is explicit in the config.

    The lr warmup is either `warmup`, a fraction of all optimizer steps, or `warmup_epochs`,
    epochs of the training stream as the reference code counts it (its ImageNet configs: 40
    of 300 epochs); exactly one of the two is set. Epochs need the number of optimizer steps
    per epoch, which the Trainer passes with `set_steps_per_epoch` before training.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        start_lr: float = 2e-4,
        final_lr: float = 1e-6,
        warmup: Optional[float] = 0.1,
        warmup_epochs: Optional[float] = None,
        weight_decay: float = 0.04,
        final_weight_decay: float = 0.4,
        ema_momentum: float = 0.996,
        final_ema_momentum: float = 1.0,
        betas: list[float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_scaling: Literal["none", "linear", "sqrt"] = "none",
        ref_batch_size: int = 256,
    ):
        if (warmup is None) == (warmup_epochs is None):
            raise ConfigError(
                f"optim.warmup (a fraction of training) and optim.warmup_epochs: set exactly one, the other "
                f"null; got warmup={warmup}, warmup_epochs={warmup_epochs}"
            )
        if warmup is not None and not 0.0 <= warmup < 1.0:
            raise ConfigError(f"optim.warmup: expected a fraction of training in [0, 1), got {warmup}")
        if warmup_epochs is not None and not 0.0 <= warmup_epochs < math.inf:
            raise ConfigError(f"optim.warmup_epochs: expected a number of epochs >= 0, got {warmup_epochs}")
        if not (0.0 <= ema_momentum <= 1.0 and 0.0 <= final_ema_momentum <= 1.0):
            raise ConfigError("optim.ema_momentum and optim.final_ema_momentum must lie in [0, 1]")
        if min(lr, start_lr, final_lr) < 0 or ref_batch_size <= 0:
            raise ConfigError("optim: learning rates must be >= 0 and ref_batch_size > 0")
        self.lr, self.start_lr, self.final_lr = lr, start_lr, final_lr
        self.warmup, self.warmup_epochs = warmup, warmup_epochs
        self.steps_per_epoch: Optional[int] = None
        self.weight_decay, self.final_weight_decay = weight_decay, final_weight_decay
        self.ema_momentum, self.final_ema_momentum = ema_momentum, final_ema_momentum
        self.betas, self.eps = tuple(betas), eps
        self.lr_scaling, self.ref_batch_size = lr_scaling, ref_batch_size
        self.lr_scale = 1.0

    def set_global_batch(self, global_batch: int) -> None:
        ratio = global_batch / self.ref_batch_size
        self.lr_scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Optimizer steps per epoch of the training stream (needed by `warmup_epochs`)."""
        if steps_per_epoch < 1:
            raise ConfigError(f"steps per epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch

    def warmup_steps(self, total: int) -> int:
        """Optimizer steps of linear lr warmup in a run of `total` steps (at most `total`)."""
        if self.warmup_epochs is None:
            return int(round(self.warmup * total))
        if self.steps_per_epoch is None:
            raise ConfigError("optim.warmup_epochs needs the steps per epoch: call set_steps_per_epoch first")
        return min(total, int(round(self.warmup_epochs * self.steps_per_epoch)))

    def build(self, model: nn.Module, fused: bool = False) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; biases and norm weights (ndim <= 1) get no decay."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False},
        ]
        kind = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=self.start_lr, betas=self.betas, eps=self.eps, **kind)

    def lr_at(self, step: int, total: int) -> float:
        warm = self.warmup_steps(total)
        s = self.lr_scale
        return warmup_cosine(step, total, warm, s * self.start_lr, s * self.lr, s * self.final_lr)

    def weight_decay_at(self, step: int, total: int) -> float:
        return cosine(step, total, self.weight_decay, self.final_weight_decay)

    def momentum_at(self, step: int, total: int) -> float:
        return linear(step, total, self.ema_momentum, self.final_ema_momentum)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, total: int) -> tuple[float, float]:
        """Set lr and weight decay of `optimizer` for optimizer step `step`; return them."""
        lr, wd = self.lr_at(step, total), self.weight_decay_at(step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("decay"):
                group["weight_decay"] = wd
        return lr, wd
