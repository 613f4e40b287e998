"""``dataset.decode: gpu``: JPEGs decoded and cropped on the training device, in batches.

On a 16-core host, decoding full-size ImageNet JPEGs on the CPU feeds ~2,300-4,300 img/s
(../shared/PEER_BENCHMARKS.md), less than a fast ViT-S step consumes. With ``decode: gpu``
the work is split:

* in the loader workers, a dataset item is only the file's bytes and its augmentation
  parameters (``EncodedImage``): the image size is read from the JPEG header
  (hjepa.data.decode.jpeg_size) and the crop box, flip and jitter are drawn with exactly the
  RNG calls of the CPU transform (hjepa.data.cache.DeviceAugment.sample), so the boxes are
  those of ``decode: cpu`` for the same seed;
* in the training process, `decode_batch` decodes the whole batch with torchvision's
  batched nvJPEG decoder (``torchvision.io.decode_jpeg(list, device="cuda")``), crops and
  resizes each image there (``F.resized_crop``, bilinear with antialiasing, as the CPU
  path), then flips and jitters the batch with the cache's batched ops.

The same code runs on the CPU (``decode_jpeg`` on the CPU: the CPU path's own decoder), where
it gives the CPU path's pixels exactly unless that path decoded at reduced DCT scale (then
within JPEG noise; see hjepa.data.decode.decode_resized_crop); nvJPEG's IDCT and colour
conversion differ from libjpeg-turbo's by a few grey levels.

Files that are not JPEGs are decoded and cropped in the worker (``EncodedImage.pixels``).
A JPEG that the device decoder refuses (CMYK, progressive variants nvJPEG lacks, corrupt
data) is decoded on the CPU (torchvision, then PIL); one that no decoder reads follows the
dataset's ``on_error``: ``raise`` stops with the file's name, ``skip`` logs it, counts it in
``data/skipped_images`` and fills its place in the batch with another image of the batch.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from hjepa.data.batch import EncodedBatch, EncodedImage
from hjepa.data.cache import DeviceAugment
from hjepa.data.decode import DEFAULT_MAX_PIXELS, UnreadableImageError, check_pixels, decode_bytes, jpeg_size
from hjepa.data.transforms import split_crop
from hjepa.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu")
_EMPTY = torch.empty(0, dtype=torch.uint8)


def check_decode_mode(decode: str, cache: str = "none") -> str:
    if decode not in DECODE_MODES:
        raise ConfigError(f"dataset.decode: expected one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "gpu" and cache != "none":
        raise ConfigError(f"dataset.decode=gpu with dataset.cache={cache}: a cache decodes every image once and "
                          "keeps it; decode=gpu decodes every batch on the device. Choose one (decode=cpu keeps the cache)")
    return decode


def gpu_augment(decode: str, transform: Optional[Callable]) -> Optional[DeviceAugment]:
    """The device version of `transform` for ``decode: gpu``, or None when items are decoded on
    the CPU: with ``decode: cpu``, and for a transform that does not start with a random
    resized crop (the evaluation transform, or none: evaluation splits of a ``decode: gpu``
    dataset decode on the CPU). A training transform that starts with one but has steps the
    device cannot apply is a ConfigError."""
    if decode != "gpu" or split_crop(transform) is None:
        return None
    augment = DeviceAugment.from_transform(transform)
    if augment is None:
        raise ConfigError(f"dataset.decode=gpu supports RandomResizedCrop (bilinear) [+ horizontal flip] "
                          f"[+ colour jitter without hue], in that order; the transform is {transform}. "
                          "Use dataset.decode=cpu for it")
    return augment


def encode_item(data: Tensor, name: str, augment: DeviceAugment,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImage:
    """What a loader worker returns for one file with ``decode: gpu``: the bytes of a JPEG and
    its parameters, drawn from the header's image size; any other format decoded and cropped
    here, with the same draws. Raises UnreadableImageError for a file no decoder reads or
    one of more than `max_pixels`."""
    size = jpeg_size(data)
    if size is not None:
        check_pixels(size, name, max_pixels)
        return EncodedImage(data, augment.sample(0, *size), augment.size, name)
    image = decode_bytes(data, name, max_pixels)
    params = augment.sample(0, *image.shape[-2:])
    return EncodedImage(_EMPTY, params, augment.size, name, pixels=_crop(image, params, augment.size))


def _crop(image: Tensor, params: Tensor, size: tuple[int, int]) -> Tensor:
    """The item's crop box (clamped to the image: a header may lie) resized to `size`, as the
    CPU path does it (bilinear, antialiased)."""
    height, width = image.shape[-2:]
    top, left, h, w = (int(v) for v in params[1:5].tolist())
    top, left = min(max(top, 0), height - 1), min(max(left, 0), width - 1)
    h, w = max(1, min(h, height - top)), max(1, min(w, width - left))
    return F.resized_crop(image, top, left, h, w, size=list(size), antialias=True)


def decode_jpegs(datas: list[Tensor], device: torch.device) -> list[Optional[Tensor]]:
    """Decode JPEG byte tensors to uint8 RGB [3, H, W] on `device`: the whole list in one call
    (nvJPEG's batched decode on a GPU), then one by one if that fails; None for each one
    the device decoder refuses."""
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:
        log.info("batched JPEG decode on %s failed (%s); decoding one by one", device, str(e).splitlines()[0][:200])
    out: list[Optional[Tensor]] = []
    for data in datas:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def decode_batch(encoded: EncodedBatch, device: torch.device,
                 unreadable: Callable[[int, UnreadableImageError], None]) -> Tensor:
    """uint8 [B, 3, *size] on `device` for a batch of encoded images: decode, crop and resize,
    flip, jitter. `unreadable(row, error)` is called for an item that no decoder reads; it
    raises (on_error: raise) or returns, and the row then repeats another image of the batch."""
    B = len(encoded)
    rows = [i for i in range(B) if i not in encoded.pixels]
    decoded = decode_jpegs([encoded.item_bytes(i) for i in rows], device)
    out = torch.empty((B, 3, *encoded.size), dtype=torch.uint8, device=device)
    good, bad = [], []
    for i, image in zip(rows, decoded):
        if image is None:  # refused by the device decoder: torchvision, then PIL, on the CPU
            try:
                image = decode_bytes(encoded.item_bytes(i), encoded.names[i]).to(device)
            except UnreadableImageError as e:
                unreadable(i, e)
                bad.append(i)
                continue
            log.info("%s: decoded on the CPU (the %s decoder refused it)", encoded.names[i], device.type)
        out[i] = _crop(image, encoded.params[i], encoded.size)
        good.append(i)
    for i, pixels in encoded.pixels.items():
        out[i] = pixels.to(device, non_blocking=True)
        good.append(i)
    if bad:
        if not good:
            raise DataError(f"no image of the batch could be decoded (first: {encoded.names[bad[0]]})")
        for k, i in enumerate(bad):
            out[i] = out[good[k % len(good)]]
    return _flip_and_jitter(out, encoded.params)


def _flip_and_jitter(images: Tensor, params: Tensor) -> Tensor:
    """The flip and colour jitter of DeviceAugment.apply, batched; skipped (no device work)
    when no item of the batch has any (checked on the CPU copy of the parameters)."""
    flips, jitter = params[:, 5] > 0.5, (params[:, 9:13] < 4).any()
    if not flips.any() and not jitter:
        return images
    B = images.shape[0]
    p = params.to(images.device, torch.float32, non_blocking=True)
    x = images.float()
    if flips.any():
        x = torch.where(p[:, 5].view(B, 1, 1, 1) > 0.5, x.flip(-1), x)
    if jitter:
        x = DeviceAugment._jitter(x, p[:, 6:9], p[:, 9:13])
    return x.clamp_(0, 255).to(torch.uint8)


def decodes_on_device(dataset: object) -> bool:
    """Whether a dataset's training items are EncodedImage (``decode: gpu`` with a train transform)."""
    return dataset.gpu_augment is not None


def check_decoders(names: list[str], datasets: list[object]) -> None:
    """Either every mixture component decodes on the device, with one output size, or none does."""
    on = [n for n, d in zip(names, datasets) if decodes_on_device(d)]
    off = [n for n, d in zip(names, datasets) if not decodes_on_device(d)]
    if on and off:
        raise ConfigError(f"mixture: component(s) {', '.join(on)} decode on the GPU (decode: gpu) and "
                          f"{', '.join(off)} do not; their batches cannot be combined. Set the same dataset "
                          "decode (and cache) on every component")
    sizes = {d.gpu_augment.size for d in datasets if decodes_on_device(d)}
    if len(sizes) > 1:
        raise ConfigError(f"mixture: components decoded on the GPU produce different image sizes {sorted(sizes)}")
