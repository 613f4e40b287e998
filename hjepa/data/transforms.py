"""Train and eval transforms on uint8 [3, H, W] tensors (torchvision.transforms.v2), and the
normalisation to float, which runs on the device on whole batches instead of in workers."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torchvision.transforms import v2

from hjepa.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    size: int, scale: list[float], ratio: list[float], hflip: float, color_jitter: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """RandomResizedCrop to `size` (+ horizontal flip with probability `hflip`, + brightness,
    contrast and saturation jitter of strength `color_jitter`); uint8 in, uint8 out.

    Images smaller than `size` (CIFAR at 224) are upsampled by the crop's resize.
    """
    _check_size(size)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"transform.scale: expected [min, max] with 0 < min <= max <= 1, got {list(scale)}")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] or not all(map(math.isfinite, ratio)):
        raise ConfigError(f"transform.ratio: expected [min, max] with 0 < min <= max, got {list(ratio)}")
    if not 0 <= hflip <= 1:
        raise ConfigError(f"transform.hflip: expected a probability in [0, 1], got {hflip}")
    if not 0 <= color_jitter < math.inf:
        raise ConfigError(f"transform.color_jitter: expected a strength >= 0, got {color_jitter}")
    ops: list[Callable] = [v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    if color_jitter > 0:
        ops.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose(ops)


def split_crop(transform: Optional[Callable]) -> Optional[tuple[v2.RandomResizedCrop, Optional[Callable]]]:
    """(the leading RandomResizedCrop, the rest or None) of a v2 transform that starts with
    one, else None. Datasets use it to crop while decoding (hjepa.data.decode.decode_resized_crop)."""
    ops = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    if not ops or not isinstance(ops[0], v2.RandomResizedCrop):
        return None
    rest = ops[1:]
    return ops[0], (v2.Compose(rest) if rest else None)


def crop_box(crop: v2.RandomResizedCrop, height: int, width: int) -> dict[str, int]:
    """A random box (top, left, height, width) of `crop` for an image of height x width,
    drawn with exactly the RNG calls `crop(image)` makes, without needing the pixels."""
    shape_only = torch.zeros((), dtype=torch.uint8).expand(3, height, width)  # v2 reads only the size
    return crop.make_params([shape_only])


def eval_transform(size: int, crop_ratio: float = 0.875) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize the short side to round(size / crop_ratio), then centre-crop `size`."""
    _check_size(size)
    if not 0 < crop_ratio <= 1:
        raise ConfigError(f"transform.crop_ratio: expected a value in (0, 1], got {crop_ratio}")
    return v2.Compose([v2.Resize(round(size / crop_ratio), antialias=True), v2.CenterCrop(size)])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (on any device) -> float32 normalised with ImageNet mean/std."""
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize expects uint8 images [..., 3, H, W], got {images.dtype} {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1) * 255)
    return (images.float() - mean) * inv_std


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"transform.size: expected a positive int, got {size!r}")
