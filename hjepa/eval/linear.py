"""`eval=linear`: a linear classifier on frozen average-pooled tokens (the I-JEPA protocol).

A parameter-free BatchNorm (affine=False) standardises the features before the linear
layer, as in MAE / I-JEPA's linear probing, so one lr grid fits encoders whose feature
scales differ; its running statistics are a plain average over all training batches
(momentum=None), exact for frozen features however short the training. `last4: true` uses
the concatenated pooled outputs of the last 4 blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hjepa.eval.probe import Features, ProbeTraining


class LinearProbe:
    name = "linear"

    def __init__(
        self,
        last4: bool = False,
        lrs: Sequence[float] = (1e-4, 1e-3, 1e-2),
        epochs: int = 100,
        batch_size: int = 1024,
        weight_decay: float = 1e-4,
        val_fraction: float = 0.1,
        seed: int = 0,
    ):
        self.last4 = last4
        self.kind = "last4" if last4 else "pooled"
        self.training = ProbeTraining(list(lrs), epochs, batch_size, weight_decay, val_fraction, seed)

    def settings(self) -> dict:
        return {"last4": self.last4, **vars(self.training)}

    def __call__(self, train: Features, test: Features, num_classes: int, device: torch.device) -> dict:
        dim = train[0].shape[1]
        def head() -> nn.Module:
            return nn.Sequential(nn.BatchNorm1d(dim, affine=False, momentum=None), nn.Linear(dim, num_classes))

        return self.training.fit_and_score(head, train, test, device)
