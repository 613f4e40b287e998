"""Which labeled images an evaluation trains on and which it scores.

A dataset config names its labeled split and its labeled eval split through the class
attributes `labeled_split` / `eval_split` (ImageNet(-100): train / val, CIFAR and STL-10:
train / test, synthetic: train / val, image_folder: train / val when `val_root` or
`holdout` is set). A dataset without an eval split is scored on a fixed held-out part of
its labeled split: HOLDOUT_FRACTION of each class, drawn with HOLDOUT_SEED, the rest is
the training side. The draw does not depend on the run's seed, so runs stay comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import hydra.utils
import torch
from torch.utils.data import Dataset, Subset

from hjepa.config import build
from hjepa.errors import DataError

HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0


@dataclass
class LabeledSplits:
    name: str          # the dataset's name (a mixture component name, a config option or its class)
    train: Dataset     # labeled images the probe / kNN memory is fitted on
    eval: Dataset      # labeled images it is scored on
    train_split: str   # e.g. "train"
    eval_split: str    # e.g. "val", or "train[held-out 10%]"
    classes: list[str]


def labeled_splits(configs: dict[str, Any], transform: Callable) -> LabeledSplits:
    """The labeled and eval splits of the first dataset config that has an eval split,
    else a held-out part of the first one's labeled split. `configs`: name -> dataset config."""
    first = None
    for name, config in configs.items():
        split = hydra.utils.get_class(config["_target_"]).labeled_split
        labeled = build(config, split=split, transform=transform)
        if labeled.eval_split:
            queries = build(config, split=labeled.eval_split, transform=transform)
            return LabeledSplits(name, labeled, queries, split, labeled.eval_split, list(labeled.classes))
        if first is None:
            first = name, labeled, split
    name, labeled, split = first
    kept, held = stratified_split(labels_of(labeled), HOLDOUT_FRACTION, HOLDOUT_SEED)
    if len(held) == 0:
        raise DataError(f"{name}: no eval split and too few images per class to hold any out")
    tag = f"{split}[held-out {HOLDOUT_FRACTION:.0%} per class, seed {HOLDOUT_SEED}]"
    return LabeledSplits(name, Subset(labeled, kept.tolist()), Subset(labeled, held.tolist()),
                         f"{split}[rest]", tag, list(labeled.classes))


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (kept, held): round(fraction * n) items of each class (at least one,
    and never all of a class) are held, chosen with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique():  # sorted: the draw is a pure function of (labels, fraction, seed)
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:k])
        kept.append(idx[k:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The labels of a dataset (or a Subset of one) without decoding any image."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return torch.as_tensor(dataset.targets, dtype=torch.long)
