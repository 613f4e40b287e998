"""Online monitoring of the target encoder during and after training: kNN accuracy on
held-out labeled images, and collapse signals of the same features.

The memory bank is the labeled training split and the queries the dataset's eval split
(or a fixed held-out part of the labeled split, see hjepa.eval.splits), both with the eval
transform, each capped at a seeded random subset of `max_*_images` so a check stays cheap.
The collapse signals (hjepa.eval.collapse) are computed on the query features; a warning
is returned when std < collapse_std / sqrt(D) or the effective rank < collapse_rank.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset, Subset

from hjepa.errors import ConfigError
from hjepa.eval.collapse import collapse_stats, collapse_warning
from hjepa.eval.features import extract
from hjepa.eval.knn import knn_accuracy
from hjepa.eval.splits import labels_of


class Monitor:
    """`every_epochs`: also evaluate every N epochs during training (0: only at the end when
    `at_end`); the same kNN on a randomly initialised encoder of the same shape and seed is
    the end-of-run baseline."""

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
        collapse_std: float = 0.05,
        collapse_rank: float = 1.5,
    ):
        if every_epochs < 0 or k < 1 or not temperature > 0 or batch_size < 1:
            raise ConfigError("monitor: expected every_epochs >= 0, k >= 1, temperature > 0 and batch_size >= 1")
        if any(m is not None and m < 2 for m in (max_train_images, max_eval_images)):
            raise ConfigError("monitor: max_train_images and max_eval_images must be >= 2 or null")
        self.every_epochs, self.at_end = every_epochs, at_end
        self.k, self.temperature = k, temperature
        self.max_train_images, self.max_eval_images = max_train_images, max_eval_images
        self.batch_size, self.crop_ratio = batch_size, crop_ratio
        self.collapse_std, self.collapse_rank = collapse_std, collapse_rank
        self._baseline: Optional[dict[str, float]] = None

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.at_end

    def attach(self, memory: Dataset, queries: Dataset, device: torch.device, num_workers: int = 0,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.memory = _subset(memory, self.max_train_images)
        self.queries = _subset(queries, self.max_eval_images)
        self.num_classes = int(max(labels_of(memory).max(), labels_of(queries).max())) + 1
        self.device, self.num_workers, self.autocast = device, num_workers, autocast

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """{knn/top1, knn/top5, features/std, features/effective_rank} of `model.target_encoder`."""
        run = dict(kind="pooled", device=self.device, batch_size=self.batch_size, num_workers=self.num_workers,
                   autocast=self.autocast)
        train_x, train_y = extract(model.target_encoder, self.memory, **run)
        query_x, query_y = extract(model.target_encoder, self.queries, **run)
        acc = knn_accuracy(train_x.to(self.device), train_y, query_x, query_y, self.num_classes, self.k,
                           self.temperature)
        stats = collapse_stats(query_x)
        self.dim = query_x.shape[1]
        return {"knn/top1": acc["top1"], "knn/top5": acc["top5"], "features/std": stats["std"],
                "features/effective_rank": stats["rank"]}

    def on_epoch_end(self, model: torch.nn.Module, epoch: int, logger) -> dict[str, float]:
        """The Trainer's per-epoch callback: evaluate every `every_epochs` epochs."""
        if not self.every_epochs or epoch % self.every_epochs:
            return {}
        metrics = self.evaluate(model)
        warning = self.warning(metrics)
        if warning:
            logger.write(f"epoch {epoch}: {warning}")
        return metrics

    def warning(self, metrics: dict[str, float]) -> Optional[str]:
        """A collapse warning for metrics from `evaluate`, or None."""
        stats = {"std": metrics["features/std"], "rank": metrics["features/effective_rank"]}
        return collapse_warning(stats, self.dim, self.collapse_std, self.collapse_rank)

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
