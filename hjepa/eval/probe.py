"""Training a small classifier head on cached frozen features, with the lr chosen on a
validation split carved from the training features.

For each lr of the grid, the head is trained on the training features minus a stratified
`val_fraction` and scored on that held-out part; the best lr then trains a fresh head on
all training features, which is scored once on the eval split. AdamW, cosine-decayed lr,
minibatches moved to the device one at a time (the cache itself stays on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.errors import ConfigError
from hjepa.eval.knn import topk_accuracy
from hjepa.eval.splits import stratified_split

Features = tuple[Tensor, Tensor]  # (features [N, ...] on the CPU, labels [N])


@dataclass
class ProbeTraining:
    lrs: list[float]
    epochs: int
    batch_size: int
    weight_decay: float
    val_fraction: float
    seed: int

    def __post_init__(self) -> None:
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ConfigError(f"eval.lrs: expected a non-empty list of positive learning rates, got {list(self.lrs)}")
        if self.epochs < 1 or self.batch_size < 1 or self.weight_decay < 0 or not 0 < self.val_fraction < 1:
            raise ConfigError("eval: expected epochs >= 1, batch_size >= 1, weight_decay >= 0 and "
                              f"0 < val_fraction < 1, got {self.epochs}, {self.batch_size}, {self.weight_decay}, {self.val_fraction}")

    def fit_and_score(self, make_head: Callable[[], nn.Module], train: Features, test: Features,
                      device: torch.device) -> dict:
        x, y = train
        val_top1 = {}
        if len(self.lrs) > 1:
            kept, held = stratified_split(y, self.val_fraction, self.seed)
            for lr in self.lrs:
                head = self.fit(make_head, (x[kept], y[kept]), lr, device)
                val_top1[lr] = score(head, (x[held], y[held]), self.batch_size, device)["top1"]
        best = max(val_top1, key=val_top1.get) if val_top1 else self.lrs[0]
        head = self.fit(make_head, train, best, device)
        result = score(head, test, self.batch_size, device)
        return {**result, "lr": best, "val_top1": {f"{lr:g}": acc for lr, acc in val_top1.items()}}

    def fit(self, make_head: Callable[[], nn.Module], train: Features, lr: float, device: torch.device) -> nn.Module:
        x, y = train
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # the head's initialisation
        head = make_head().to(device).train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=self.weight_decay)
        steps_per_epoch = math.ceil(len(x) / self.batch_size)
        total = self.epochs * steps_per_epoch
        step = 0
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), self.batch_size):
                idx = order[start:start + self.batch_size]
                if len(idx) < 2 and len(x) >= 2:  # BatchNorm needs two items; drop a last batch of one
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(head(x[idx].to(device).float()), y[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        return head.eval()


@torch.no_grad()
def score(head: nn.Module, data: Features, batch_size: int, device: torch.device) -> dict[str, float]:
    x, y = data
    head.eval()
    logits = torch.cat([head(x[i:i + batch_size].to(device).float()).cpu() for i in range(0, len(x), batch_size)])
    return topk_accuracy(logits, y)
