"""What flows from a dataset to the loss: the dataset contract, an item, and a batch.

A dataset (any class in hjepa.data) returns ``(image, label)`` per index, where image is a
uint8 tensor [3, H, W] after its transform, or, for a dataset that keeps its images
decoded (``cache: memory|device``) and augments them on the device, the ``AugmentParams``
of that item. The Mixture names each item (`Item`), the mask collator stacks items into a
`Batch` and adds the masks, and `Mixture.to_device` turns a batch into images on the
training device (augmenting the cached ones there).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hjepa.data.cache import ImageCache


@dataclass(frozen=True)
class AugmentParams:
    """One item's augmentation parameters, in place of its pixels (see hjepa.data.cache)."""

    values: Tensor  # float64 [cache.PARAMS_WIDTH]


class ImageDataset(Protocol):
    """The contract every dataset of hjepa.data keeps (training, evaluation and verify use
    nothing else)."""

    labeled_split: ClassVar[str]   # the split with labels that probes train on ("train")
    eval_split: Optional[str]      # the labeled split probes are scored on; None: hold out part of labeled_split
    classes: list[str]
    targets: list[int]             # one label per item, -1 for unlabeled items; known without decoding
    cache: Optional["ImageCache"]  # decoded images kept in memory / on the device, else None

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far (in this process and its loader workers)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Union[Tensor, AugmentParams], int]: ...


class Item(NamedTuple):
    """One draw of the training stream: an image or its augmentation parameters. (A named
    tuple, so that DataLoader's default collate also batches items field by field.)"""

    image: Union[Tensor, AugmentParams]
    label: int
    source: int                  # index of the mixture component it came from
    key: Optional[int] = None    # the seed of its augmentation (and, for the first item, of the masks)


@dataclass
class Batch:
    """A training batch. Exactly one of `images` and `params` is set."""

    labels: Tensor                   # int64 [B]
    sources: Tensor                  # int64 [B]: mixture component of each item
    context: Tensor                  # int64 [B, K]: context patch indices
    targets: Tensor                  # int64 [B, T, M]: patch indices of T target blocks
    images: Optional[Tensor] = None  # uint8 [B, 3, H, W]
    params: Optional[Tensor] = None  # float64 [B, P]: augmentation parameters of cached items

    @classmethod
    def collate(cls, items: list[Item], context: Tensor, targets: Tensor) -> "Batch":
        deferred = [isinstance(item.image, AugmentParams) for item in items]
        if any(deferred) and not all(deferred):
            raise ValueError("a batch mixes images and augmentation parameters: every mixture component "
                             "must use the same dataset cache setting")
        stacked = torch.stack([item.image.values if deferred[0] else item.image for item in items])
        return cls(
            labels=torch.tensor([item.label for item in items], dtype=torch.long),
            sources=torch.tensor([item.source for item in items], dtype=torch.long),
            context=context,
            targets=targets,
            images=None if deferred[0] else stacked,
            params=stacked if deferred[0] else None,
        )

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                for f in fields(self) if getattr(self, f.name) is not None})
