"""Small datasets kept decoded (``cache: memory|device``) and augmented on the device in batches.

With ``cache: memory`` a dataset decodes every image once, at construction, into one uint8
tensor [N, 3, Hmax, Wmax] (images smaller than the largest are stored top-left, their
padding filled by repeating the last row and column so that bilinear sampling at an edge
never blends in anything else); ``cache: device`` also moves that tensor to the training
device on first use (CIFAR-10: 150 MB). Nothing is decoded again after that.

The train transform (RandomResizedCrop [+ RandomHorizontalFlip] [+ ColorJitter], as built
by hjepa.data.transforms.train_transform) is then split in two:

* in the loader workers, the dataset returns per-item augmentation parameters instead of
  pixels (``DeviceAugment.sample``): the crop box, the flip and the jitter factors and
  order, drawn from torch's RNG with exactly the calls the CPU transform makes. The Mixture
  seeds that RNG per item from the sampler's key, so the parameters, like every other
  augmentation here, are a pure function of (seed, epoch, position): resume stays
  bit-identical and the worker count does not matter.
* on the device, a whole batch is gathered from the decoded tensor and cropped and resized
  in one ``torchvision.ops.roi_align`` call (bilinear; each output pixel averages
  ceil(crop / output) samples per axis when shrinking, which stands in for the CPU
  transform's antialiasing), then flipped and jittered with batched tensor ops
  (``DeviceAugment.apply``), and rounded back to uint8 so that the usual ``normalize``
  follows. Without a GPU the same code runs on the CPU.

Such an item is an ``AugmentParams`` (hjepa.data.batch) in place of the image; a batch of
them carries ``params`` instead of ``images``, and ``Mixture.to_device`` turns it into
images with ``augment_batch``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

from hjepa.data.batch import AugmentParams
from hjepa.data.transforms import crop_box
from hjepa.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "device")
# index, top, left, height, width, flip, brightness, contrast, saturation, 4 x jitter order
PARAMS_WIDTH = 13
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def check_cache_mode(cache: str) -> str:
    if cache not in CACHE_MODES:
        raise ConfigError(f"dataset.cache: expected one of {', '.join(CACHE_MODES)}, got {cache!r}")
    return cache


def _mode(interpolation) -> str:
    """InterpolationMode or its string (torchvision versions differ) -> "bilinear", ..."""
    return str(getattr(interpolation, "value", interpolation))


class DeviceAugment:
    """The train transform as (parameters drawn per item on the CPU) + (batched application)."""

    def __init__(self, crop: v2.RandomResizedCrop, flip: Optional[v2.RandomHorizontalFlip],
                 jitter: Optional[v2.ColorJitter]):
        self.crop, self.flip, self.jitter = crop, flip, jitter
        self.size = tuple(crop.size)

    @classmethod
    def from_transform(cls, transform: Optional[Callable]) -> Optional["DeviceAugment"]:
        """The device version of `transform`, or None when it is not RandomResizedCrop
        (bilinear) [+ RandomHorizontalFlip] [+ ColorJitter without hue], in that order."""
        ops = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
        if not ops or not isinstance(ops[0], v2.RandomResizedCrop) or _mode(ops[0].interpolation) != "bilinear":
            return None
        crop, flip, jitter = ops.pop(0), None, None
        if ops and isinstance(ops[0], v2.RandomHorizontalFlip):
            flip = ops.pop(0)
        if ops and isinstance(ops[0], v2.ColorJitter) and ops[0].hue is None:
            jitter = ops.pop(0)
        return None if ops else cls(crop, flip, jitter)

    def sample(self, index: int, height: int, width: int) -> Tensor:
        """Parameters for one item of an image of height x width: float64 [PARAMS_WIDTH].

        Draws from torch's global RNG with the same calls, in the same order, as the CPU
        transform, so both give the same crop boxes, flips and factors for the same seed."""
        p = torch.zeros(PARAMS_WIDTH, dtype=torch.float64)
        box = crop_box(self.crop, height, width)
        p[0:5] = torch.tensor([index, box["top"], box["left"], box["height"], box["width"]], dtype=torch.float64)
        if self.flip is not None:
            p[5] = float(bool(torch.rand(1) < self.flip.p))  # as RandomApply: flip unless rand >= p
        p[6:9] = 1.0
        p[9:13] = torch.tensor([4, 4, 4, 4], dtype=torch.float64)  # no jitter op
        if self.jitter is not None:
            j = self.jitter.make_params([])
            p[6:9] = torch.tensor([1.0 if j[k] is None else j[k] for k in
                                   ("brightness_factor", "contrast_factor", "saturation_factor")], dtype=torch.float64)
            p[9:13] = j["fn_idx"].to(torch.float64)
        return p

    def apply(self, images: Tensor, params: Tensor) -> Tensor:
        """images uint8 [B, 3, H, W], params [B, PARAMS_WIDTH] on the same device -> uint8
        [B, 3, size, size]: crop + resize, flip, jitter. Batched, no host synchronisation."""
        B = images.shape[0]
        p = params.to(torch.float32)
        top, left, height, width = p[:, 1], p[:, 2], p[:, 3], p[:, 4]
        batch_index = torch.arange(B, device=images.device, dtype=torch.float32)
        boxes = torch.stack([batch_index, left, top, left + width, top + height], dim=1)
        # aligned=True: output pixel centres map as in F.interpolate(align_corners=False);
        # sampling_ratio=-1: ceil(crop / output) samples per bin and axis (box-filters shrinks).
        x = roi_align(images.float(), boxes, output_size=self.size, spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True).round_()
        if self.flip is not None:
            x = torch.where(p[:, 5].view(B, 1, 1, 1) > 0.5, x.flip(-1), x)
        if self.jitter is not None:
            x = self._jitter(x, p[:, 6:9], p[:, 9:13])
        return x.clamp_(0, 255).to(torch.uint8)

    @staticmethod
    def _jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
        """Brightness, contrast, saturation in each item's own random order, as v2.ColorJitter
        on uint8 (each step blends, clamps to [0, 255] and truncates to an integer)."""
        B = x.shape[0]
        w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        b, c, s = (factors[:, k].view(B, 1, 1, 1) for k in range(3))
        for stage in range(4):
            op = order[:, stage].view(B, 1, 1, 1)
            gray = (x * w).sum(1, keepdim=True).floor()
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            bright = x * b
            contrast = x * c + mean * (1 - c)
            saturate = x * s + gray * (1 - s)
            y = torch.where(op == 0, bright, torch.where(op == 1, contrast, torch.where(op == 2, saturate, x)))
            x = torch.where(op < 3, y.clamp(0, 255).floor(), x)
        return x


class DecodedImages:
    """N decoded images in one uint8 tensor [N, 3, Hmax, Wmax] (+ their sizes [N, 2])."""

    def __init__(self, pixels: Tensor, sizes: Tensor):
        self.pixels, self.sizes = pixels, sizes

    @classmethod
    def decode(cls, load: Callable[[int], Tensor], count: int, threads: Optional[int] = None) -> "DecodedImages":
        """Decode items 0..count-1 with `load` (uint8 [3, h, w]) on a pool of threads."""
        threads = threads or max(1, min(16, os.cpu_count() or 1))
        with ThreadPoolExecutor(threads) as pool:
            images = list(pool.map(load, range(count), chunksize=64))
        sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.long)
        hmax, wmax = (int(v) for v in sizes.max(0).values)
        pixels = torch.empty(count, 3, hmax, wmax, dtype=torch.uint8)
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            pixels[i, :, :h, :w] = img
            if w < wmax:  # repeat the last column, then the last row, into the padding
                pixels[i, :, :h, w:] = img[:, :, w - 1:w]
            if h < hmax:
                pixels[i, :, h:, :] = pixels[i, :, h - 1:h, :]
        return cls(pixels, sizes)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def size(self, index: int) -> tuple[int, int]:
        h, w = self.sizes[index].tolist()
        return h, w

    def image(self, index: int) -> Tensor:
        h, w = self.size(index)
        return self.pixels[index, :, :h, :w]

    @property
    def nbytes(self) -> int:
        return self.pixels.numel()


# Decoded tensors by content key, so that the train and eval splits built from the same
# files (the monitor builds its own dataset objects) decode once per process.
_MEMO: "OrderedDict[tuple, DecodedImages]" = OrderedDict()
_MEMO_SIZE = 2


class ImageCache:
    """What a dataset with ``cache: memory|device`` holds: the decoded images, where they
    live during training, and the device version of its transform (None when the
    transform has none: then items are the transform applied to the decoded image)."""

    def __init__(self, residence: str, decoded: DecodedImages, transform: Optional[Callable]):
        self.residence = residence
        self.decoded = decoded
        self.augment = DeviceAugment.from_transform(transform)
        self._on_device: dict[str, Tensor] = {}

    @classmethod
    def build(cls, residence: str, key: tuple, load: Callable[[int], Tensor], count: int,
              transform: Optional[Callable]) -> "ImageCache":
        decoded = _MEMO.get(key)
        if decoded is None:
            decoded = DecodedImages.decode(load, count)
            _MEMO[key] = decoded
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
            log.info("decoded %d images into %.1f MB (cache=%s)", count, decoded.nbytes / 1e6, residence)
        _MEMO.move_to_end(key)
        return cls(residence, decoded, transform)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_on_device"] = {}  # loader workers never need the device copy
        return state

    def item(self, index: int, transform: Optional[Callable]) -> Tensor | AugmentParams:
        if self.augment is not None:
            return AugmentParams(self.augment.sample(index, *self.decoded.size(index)))
        image = self.decoded.image(index)
        return transform(image) if transform is not None else image.clone()

    def gather(self, index: Tensor, device: torch.device) -> Tensor:
        """The padded images of `index` (CPU int64 [B]) as uint8 [B, 3, Hmax, Wmax] on `device`."""
        if self.residence == "device" or device.type == "cpu":
            key = str(device)
            pixels = self._on_device.get(key)
            if pixels is None:
                pixels = self._on_device[key] = self.decoded.pixels.to(device)
            return pixels[index.to(device, non_blocking=True)]
        batch = self.decoded.pixels[index]
        if device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)


def augment_batch(params: Tensor, sources: Tensor, caches: Sequence[ImageCache], device: torch.device) -> Tensor:
    """Images uint8 [B, 3, S, S] on `device` for a batch of augmentation parameters; item i
    comes from ``caches[sources[i]]``. Grouping by source happens on the CPU tensors, so
    nothing waits for the device."""
    index = params[:, 0].long()
    present = sorted(set(sources.tolist()))
    if len(present) == 1:
        cache = caches[present[0]]
        return cache.augment.apply(cache.gather(index, device), params.to(device, non_blocking=True))
    out = None
    for d in present:
        cache = caches[d]
        rows = (sources == d).nonzero().squeeze(1)  # CPU tensors: no device wait
        part = cache.augment.apply(cache.gather(index[rows], device), params[rows].to(device, non_blocking=True))
        if out is None:
            out = torch.empty((params.shape[0], *part.shape[1:]), dtype=torch.uint8, device=device)
        out[rows.to(device, non_blocking=True)] = part
    return out


def check_caches(names: Sequence[str], caches: Sequence[Optional[ImageCache]]) -> None:
    """Either every mixture component augments on the device, with one output size, or none does."""
    deferred = [c is not None and c.augment is not None for c in caches]
    if any(deferred) and not all(deferred):
        on = [n for n, d in zip(names, deferred) if d]
        off = [n for n, d in zip(names, deferred) if not d]
        raise ConfigError(
            f"mixture: component(s) {', '.join(on)} augment on the device (cache: memory|device) and "
            f"{', '.join(off)} in the loader workers; their batches cannot be combined. Set the same "
            "dataset cache on every component"
        )
    sizes = {c.augment.size for c, on in zip(caches, deferred) if on}
    if len(sizes) > 1:
        raise ConfigError(f"mixture: cached components produce different image sizes {sorted(sizes)}")
