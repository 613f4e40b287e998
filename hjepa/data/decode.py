"""Image decoding: bytes on disk -> uint8 RGB tensor [3, H, W].

torchvision.io decodes JPEG/PNG/WebP/GIF straight into uint8 tensors (faster than PIL per
image here, and it feeds transforms.v2 without a PIL round trip); PIL covers what it cannot
read (BMP, exotic JPEG variants). The format is sniffed from the content, so a PNG named
.JPEG loads fine. Whatever the file holds, the result is an RGB uint8 image or an
UnreadableImageError naming the file: an animated image gives its first frame, a 16-bit PNG
its high bytes, and an image of more than `max_pixels` (read from its header, before any
decoding: a decompression bomb) is refused. ``decode_resized_crop`` fuses a RandomResizedCrop into the decode: the box
is drawn from the header first, and JPEGs are decoded at 1/2..1/8 size in the DCT domain
when the box allows it without losing resolution (measured in experiments/performance).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image as _tv_decode, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hjepa.data.transforms import crop_box
from hjepa.errors import ConfigError, DataError

# torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call;
# they remain the fastest path installed, with PIL behind them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Images above this many pixels are refused unread (dataset.max_pixels): a 64-megapixel RGB
# image decodes to 192 MB, per loader worker. ImageNet's largest are about 12 megapixels.
DEFAULT_MAX_PIXELS = 64_000_000

# Leading bytes of the formats we accept (checked by verify without decoding).
_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"BM": "bmp",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}


class UnreadableImageError(DataError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def sniff_format(header: bytes) -> str | None:
    """The image format from the first 12 bytes of a file, or None when it is not an image."""
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC.items():
        if header.startswith(magic):
            return name
    return None


def read_bytes(path: str | Path) -> torch.Tensor:
    """The bytes of a file as a uint8 tensor; UnreadableImageError when it cannot be read."""
    path = str(path)
    try:
        return read_file(path)
    except (OSError, RuntimeError) as e:
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise UnreadableImageError(f"{path}: empty file (0 bytes)") from None
        raise UnreadableImageError(f"{path}: cannot read ({_first_line(e)})") from None


def decode_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W] (grayscale, CMYK, palette -> RGB).

    Raises UnreadableImageError for empty, truncated, oversized or non-image files.
    """
    return decode_bytes(read_bytes(path), str(path), max_pixels)


def decode_bytes(data: torch.Tensor, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """decode_image for bytes already read (uint8 tensor); `name` is used in error messages."""
    if data.numel() == 0:
        raise UnreadableImageError(f"{name}: empty file (0 bytes)")
    check_pixels(image_size(data), name, max_pixels)
    try:
        return _as_rgb_uint8(_tv_decode(data, mode=ImageReadMode.RGB), name)
    except RuntimeError as e:
        tv_error = _first_line(e)
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            check_pixels((im.height, im.width), name, max_pixels)
            rgb = im.convert("RGB")  # forces a full decode: truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL raises all of these
        raise UnreadableImageError(f"{name}: not a decodable image ({tv_error})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _as_rgb_uint8(image: torch.Tensor, name: str) -> torch.Tensor:
    """torchvision's decode as a [3, H, W] uint8 image: the first frame of an animation, the
    high byte of 16-bit samples; anything else that is not RGB uint8 is unreadable."""
    if image.dim() == 4:  # an animated GIF or WebP: [frames, 3, H, W]
        image = image[0]
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise UnreadableImageError(f"{name}: decodes to {image.dtype} {tuple(image.shape)}, not an RGB image")
    return image


def image_size(data: torch.Tensor) -> tuple[int, int] | None:
    """(height, width) from the header of a JPEG, PNG, GIF or BMP (microseconds, no decode);
    for other formats from PIL's lazy open; None when no header says."""
    head = data[:32].numpy().tobytes()
    if head[:3] == b"\xff\xd8\xff":
        return jpeg_size(data)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(head[8:10], "little"), int.from_bytes(head[6:8], "little")
    if head[:2] == b"BM" and len(head) >= 26:
        return abs(int.from_bytes(head[22:26], "little", signed=True)), int.from_bytes(head[18:22], "little", signed=True)
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def check_max_pixels(max_pixels: int) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"dataset.max_pixels: expected a positive int, got {max_pixels!r}")
    return max_pixels


def check_pixels(size: tuple[int, int] | None, name: str, max_pixels: int) -> None:
    if size is not None and size[0] * size[1] > max_pixels:
        h, w = size
        raise UnreadableImageError(f"{name}: {w}x{h} = {w * h / 1e6:.1f} megapixels, more than dataset.max_pixels="
                                   f"{max_pixels} (a decompression bomb, or raise the limit)")


def jpeg_reduction(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest DCT scale-down r in (1, 2, 4, 8) that keeps the crop at least as large as
    the output (crop / r >= output on both axes): decoding at 1/r then loses no resolution
    that the resize to the output would keep."""
    r = 1
    while r < 8 and crop_height // (2 * r) >= out_height and crop_width // (2 * r) >= out_width:
        r *= 2
    return r


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: torch.Tensor) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame marker, or None: a few microseconds,
    where opening the file with PIL to read its size costs more than DCT scaling saves."""
    mv = memoryview(data.numpy())
    n, i = len(mv), 2
    if n < 4 or mv[0] != 0xFF or mv[1] != 0xD8:
        return None
    while i + 9 < n:
        if mv[i] != 0xFF:
            return None
        kind = mv[i + 1]
        if kind == 0xFF:  # fill byte
            i += 1
            continue
        if kind in _SOF:
            return (mv[i + 5] << 8) | mv[i + 6], (mv[i + 7] << 8) | mv[i + 8]
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + ((mv[i + 2] << 8) | mv[i + 3])
    return None


def decode_resized_crop(data: torch.Tensor, crop: v2.RandomResizedCrop, name: str,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """``crop(decode_bytes(data))``, decoding a JPEG at a reduced size where the crop allows.

    The crop box is drawn first, from the image size in the header, with the transform's own
    ``make_params`` (so exactly the same random draws and boxes as ``crop(image)``). When the
    box is at least twice the output size, libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale in
    the DCT domain (PIL's ``draft``) and the scaled box is resized: a fraction of the decoding
    work, for a result within JPEG noise of the full-size path. Otherwise (and for any format
    but JPEG) the image is decoded fully and the result is bit-identical to ``crop(image)``.
    """
    out_h, out_w = crop.size
    size = jpeg_size(data)
    if size is None:  # not a JPEG (or an odd one): the plain path, the same draws
        image = decode_bytes(data, name, max_pixels)
        box = crop.make_params([image])
        return F.resized_crop(image, **box, size=list(crop.size), interpolation=crop.interpolation,
                              antialias=crop.antialias)
    check_pixels(size, name, max_pixels)
    height, width = size
    box = crop_box(crop, height, width)
    r = jpeg_reduction(box["height"], box["width"], out_h, out_w)
    if r == 1:
        image = decode_bytes(data, name, max_pixels)
        if tuple(image.shape[-2:]) != (height, width):  # header and decoder disagree: redraw on the truth
            box = crop.make_params([image])
        return F.resized_crop(image, **box, size=list(crop.size), interpolation=crop.interpolation,
                              antialias=crop.antialias)
    try:
        im = Image.open(io.BytesIO(data.numpy()))
        if im.size != (width, height):
            raise OSError("header size mismatch")
        im.draft(im.mode, (width // r, height // r))
        small = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UnreadableImageError(f"{name}: not a decodable image (truncated or corrupt JPEG)") from None
    sx, sy = small.size[0] / width, small.size[1] / height
    image = torch.from_numpy(np.array(small)).permute(2, 0, 1)
    top, left = int(box["top"] * sy), int(box["left"] * sx)
    h = max(1, min(round(box["height"] * sy), small.size[1] - top))
    w = max(1, min(round(box["width"] * sx), small.size[0] - left))
    return F.resized_crop(image, top, left, h, w, size=list(crop.size), interpolation=crop.interpolation,
                          antialias=crop.antialias)


def _first_line(e: Exception) -> str:
    """torchvision prefixes its messages with a C++ source location; keep the readable part."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rsplit(", ", 1)[-1] if text.startswith(("decode_", "read_file")) else text
