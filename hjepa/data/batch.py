"""What flows from a dataset to the loss: the dataset contract, an item, and a batch.

A dataset (any class in hjepa.data) returns ``(image, label)`` per index, where image is a
uint8 tensor [3, H, W] after its transform; for a dataset that keeps its images decoded
(``cache: memory|device``) and augments them on the device, the ``AugmentParams`` of that
item; for a dataset that decodes on the GPU (``decode: gpu``), the file's bytes and its
augmentation parameters (``EncodedImage``). The Mixture names each item (`Item`), the mask
collator stacks items into a `Batch` and adds the masks, and `Mixture.to_device` turns a
batch into images on the training device (augmenting the cached ones, or decoding the
encoded ones, there).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hjepa.data.cache import DeviceAugment, ImageCache


@dataclass(frozen=True)
class AugmentParams:
    """One item's augmentation parameters, in place of its pixels (see hjepa.data.cache)."""

    values: Tensor  # float64 [cache.PARAMS_WIDTH]


@dataclass(frozen=True)
class EncodedImage:
    """One item of a ``decode: gpu`` dataset: its JPEG bytes, decoded later on the training
    device (hjepa.data.gpu_decode), and its augmentation parameters (crop box on the
    full-size image, flip, jitter; the layout of hjepa.data.cache.PARAMS_WIDTH). A file that
    is not a JPEG is decoded and cropped in the loader worker instead: then `pixels` holds
    the crop and `data` is empty."""

    data: Tensor                      # uint8 [n]: the file's bytes (empty when `pixels` is set)
    params: Tensor                    # float64 [PARAMS_WIDTH]
    size: tuple[int, int]             # output (height, width) of the crop
    name: str                         # the file, for messages
    pixels: Optional[Tensor] = None   # uint8 [3, *size]: cropped and resized in the worker


@dataclass
class EncodedBatch:
    """The encoded items of a batch, their bytes in one tensor (one shared-memory block from
    the loader workers instead of one per item)."""

    data: Tensor                      # uint8 [total bytes]: item i is data[offsets[i]:offsets[i + 1]]
    offsets: Tensor                   # int64 [B + 1]
    params: Tensor                    # float64 [B, PARAMS_WIDTH]
    size: tuple[int, int]
    names: list[str]
    pixels: dict[int, Tensor]         # row -> uint8 [3, *size] for items decoded in the worker

    @classmethod
    def stack(cls, items: list[EncodedImage]) -> "EncodedBatch":
        sizes = {item.size for item in items}
        if len(sizes) > 1:
            raise ValueError(f"a batch of encoded images asks for different crop sizes {sorted(sizes)}")
        lengths = torch.tensor([0] + [item.data.numel() for item in items], dtype=torch.long)
        return cls(data=torch.cat([item.data for item in items]), offsets=lengths.cumsum(0),
                   params=torch.stack([item.params for item in items]), size=items[0].size,
                   names=[item.name for item in items],
                   pixels={i: item.pixels for i, item in enumerate(items) if item.pixels is not None})

    def __len__(self) -> int:
        return len(self.names)

    def item_bytes(self, row: int) -> Tensor:
        return self.data[int(self.offsets[row]):int(self.offsets[row + 1])]

    def pin_memory(self) -> "EncodedBatch":
        return self  # the decoder reads the bytes from host memory itself


class ImageDataset(Protocol):
    """The contract every dataset of hjepa.data keeps (training, evaluation and verify use
    nothing else)."""

    labeled_split: ClassVar[str]   # the split with labels that probes train on ("train")
    eval_split: Optional[str]      # the labeled split probes are scored on; None: hold out part of labeled_split
    classes: list[str]
    targets: list[int]             # one label per item, -1 for unlabeled items; known without decoding
    cache: Optional["ImageCache"]  # decoded images kept in memory / on the device, else None
    gpu_augment: Optional["DeviceAugment"]  # decode: gpu: items are file bytes + crops (EncodedImage), else None
    on_error: str                  # an unreadable image: "skip" it (counted) or "raise"

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far (in this process and its loader workers)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Union[Tensor, AugmentParams], int]: ...


class Item(NamedTuple):
    """One draw of the training stream: an image or its augmentation parameters. (A named
    tuple, so that DataLoader's default collate also batches items field by field.)"""

    image: Union[Tensor, AugmentParams, EncodedImage]
    label: int
    source: int                  # index of the mixture component it came from
    key: Optional[int] = None    # the seed of its augmentation (and, for the first item, of the masks)


@dataclass
class Batch:
    """A training batch. Exactly one of `images`, `params` and `encoded` is set."""

    labels: Tensor                   # int64 [B]
    sources: Tensor                  # int64 [B]: mixture component of each item
    context: Tensor                  # int64 [B, K]: context patch indices
    targets: Tensor                  # int64 [B, T, M]: patch indices of T target blocks
    images: Optional[Tensor] = None  # uint8 [B, 3, H, W]
    params: Optional[Tensor] = None  # float64 [B, P]: augmentation parameters of cached items
    encoded: Optional[EncodedBatch] = None  # file bytes to decode on the device (decode: gpu)

    @classmethod
    def collate(cls, items: list[Item], context: Tensor, targets: Tensor) -> "Batch":
        kinds = {type(item.image) if isinstance(item.image, (AugmentParams, EncodedImage)) else Tensor
                 for item in items}
        if len(kinds) > 1:
            raise ValueError("a batch mixes images, augmentation parameters and encoded images: every mixture "
                             "component must use the same dataset cache and decode settings")
        kind = kinds.pop()
        payload: dict = {}
        if kind is EncodedImage:
            payload["encoded"] = EncodedBatch.stack([item.image for item in items])
        elif kind is AugmentParams:
            payload["params"] = torch.stack([item.image.values for item in items])
        else:
            payload["images"] = torch.stack([item.image for item in items])
        return cls(
            labels=torch.tensor([item.label for item in items], dtype=torch.long),
            sources=torch.tensor([item.source for item in items], dtype=torch.long),
            context=context,
            targets=targets,
            **payload,
        )

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                for f in fields(self) if getattr(self, f.name) is not None})
