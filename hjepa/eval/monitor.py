"""kNN monitoring of the target encoder on held-out labeled images, during and after training."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset, Subset

from hjepa.eval.features import extract_features
from hjepa.eval.knn import knn_accuracy


class Monitor:
    """Scores frozen target-encoder features with weighted kNN (cosine, k, temperature).

    The memory bank is the labeled training split and the queries the dataset's eval split
    (both with the eval transform), each capped at a seeded random subset of `max_*_images`.
    The same protocol on a randomly initialised encoder of the same shape is the baseline.
    """

    def __init__(
        self,
        every_epochs: int = 0,
        at_end: bool = True,
        k: int = 20,
        temperature: float = 0.07,
        max_train_images: Optional[int] = 10000,
        max_eval_images: Optional[int] = 5000,
        batch_size: int = 256,
        crop_ratio: float = 0.875,
    ):
        self.every_epochs, self.at_end = every_epochs, at_end
        self.k, self.temperature = k, temperature
        self.max_train_images, self.max_eval_images = max_train_images, max_eval_images
        self.batch_size, self.crop_ratio = batch_size, crop_ratio
        self._baseline: Optional[dict[str, float]] = None

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.at_end

    def attach(self, memory: Dataset, queries: Dataset, device: torch.device, num_workers: int = 0,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.memory = _subset(memory, self.max_train_images)
        self.queries = _subset(queries, self.max_eval_images)
        self.device, self.num_workers, self.autocast = device, num_workers, autocast

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        run = dict(device=self.device, batch_size=self.batch_size, num_workers=self.num_workers)
        train_x, train_y = extract_features(model, self.memory, autocast=self.autocast(), **run)
        query_x, query_y = extract_features(model, self.queries, autocast=self.autocast(), **run)
        acc = knn_accuracy(train_x, train_y, query_x, query_y, self.k, self.temperature)
        return {"knn/top1": acc["top1"], "knn/top5": acc["top5"]}

    def baseline(self, make_random_model: Callable[[], torch.nn.Module]) -> dict[str, float]:
        """The same protocol on a randomly initialised model (computed once)."""
        if self._baseline is None:
            model = make_random_model().to(self.device)
            self._baseline = self.evaluate(model)
            del model
        return self._baseline


def _subset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return Subset(dataset, order.sort().values.tolist())
