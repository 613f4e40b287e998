"""Frozen features of the target encoder: eval mode, no augmentation, average-pooled tokens."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, Dataset

from hjepa.data.transforms import normalize


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256,
                     num_workers: int = 0, autocast: contextlib.AbstractContextManager | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (features [N, D] float32 on CPU, labels [N]) for every item of `dataset`.

    `model.features(images)` gives the target encoder's final tokens; they are averaged over
    tokens (the I-JEPA evaluation protocol).
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, labels = [], []
    for images, y in loader:
        with autocast or contextlib.nullcontext():
            tokens = model.features(normalize(images.to(device, non_blocking=True)))
        feats.append(tokens.float().mean(dim=1).cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)
