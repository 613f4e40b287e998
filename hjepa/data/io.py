"""Image decoding: bytes on disk -> uint8 RGB tensor [3, H, W].

torchvision.io decodes JPEG/PNG/WebP/GIF straight into uint8 tensors (about as fast as PIL
per image here, and it feeds transforms.v2 without a PIL round trip); PIL covers what it
cannot read (BMP, exotic JPEG variants). The format is sniffed from the content, so a PNG
named .JPEG loads fine.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image as _tv_decode, read_file

from hjepa.errors import DataError

# torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call;
# they remain the fastest path installed, with PIL behind them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

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


def decode_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W] (grayscale, CMYK, palette -> RGB).

    Raises UnreadableImageError for empty, truncated or non-image files.
    """
    path = str(path)
    try:
        data = read_file(path)
    except (OSError, RuntimeError) as e:
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise UnreadableImageError(f"{path}: empty file (0 bytes)") from None
        raise UnreadableImageError(f"{path}: cannot read ({_first_line(e)})") from None
    try:
        return _tv_decode(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        tv_error = _first_line(e)
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            rgb = im.convert("RGB")  # forces a full decode: truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL raises all of these
        raise UnreadableImageError(f"{path}: not a decodable image ({tv_error})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _first_line(e: Exception) -> str:
    """torchvision prefixes its messages with a C++ source location; keep the readable part."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rsplit(", ", 1)[-1] if text.startswith(("decode_", "read_file")) else text
