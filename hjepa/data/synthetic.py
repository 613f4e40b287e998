"""A built-in labeled image dataset, rendered on the fly: no files, no download.

The label is the shape (10 classes): a light shape on a dark ground. Everything else is a
random nuisance drawn per image: position (anywhere in the frame), scale, mirroring,
stripes on the shape, the two grey levels with a slight tint, a mild background gradient,
and pixel noise. Colour is deliberately almost uninformative: average-pooled ViT features
are dominated by colour, so random colours would hide the shapes from every encoder at the
budgets of a laptop demo. With colour held nearly constant, a randomly initialised encoder
separates the shapes only a little above chance (it sees area and edges), while features
that encode shape separate them well, so the gain of training shows in a few minutes.

Each image is a pure function of (seed, split, index); shapes are drawn from signed
distance functions, which gives anti-aliased edges at any size for the cost of a few
numpy operations on the pixel grid (about 0.1 ms per 32 px image).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from hjepa.errors import ConfigError

CLASSES = ["disk", "ring", "square", "frame", "triangle", "plus", "star", "crescent", "ell", "pair"]
_SPLIT_IDS = {"train": 0, "val": 1}


def _box(u: np.ndarray, v: np.ndarray, bu: float, bv: float) -> np.ndarray:
    qu, qv = np.abs(u) - bu, np.abs(v) - bv
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


def _triangle(u: np.ndarray, v: np.ndarray, r: float = 0.95) -> np.ndarray:
    # Equilateral triangle, centred on its centroid (after Inigo Quilez's 2-D distance functions).
    k = np.sqrt(3.0)
    pu, pv = np.abs(u) - r, v + r / k
    fold = pu + k * pv > 0
    pu, pv = np.where(fold, (pu - k * pv) / 2, pu), np.where(fold, (-k * pu - pv) / 2, pv)
    pu = pu - np.clip(pu, -2 * r, 0)
    return -np.hypot(pu, pv) * np.sign(pv)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five points; a radial pseudo-distance, scaled so that edges stay about one pixel soft.
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    return 0.6 * (r - (0.4 + 0.6 * (0.5 + 0.5 * np.cos(5 * theta)) ** 2))


# Signed distance (negative inside) of each class's shape, in units of the shape's radius.
_SHAPES: list[Callable[[np.ndarray, np.ndarray], np.ndarray]] = [
    lambda u, v: np.hypot(u, v) - 0.9,
    lambda u, v: np.abs(np.hypot(u, v) - 0.7) - 0.22,
    lambda u, v: _box(u, v, 0.75, 0.75),
    lambda u, v: np.abs(_box(u, v, 0.66, 0.66)) - 0.2,
    _triangle,
    lambda u, v: np.minimum(_box(u, v, 0.95, 0.28), _box(u, v, 0.28, 0.95)),
    _star,
    lambda u, v: np.maximum(np.hypot(u, v) - 0.9, -(np.hypot(u - 0.5, v) - 0.7)),
    lambda u, v: np.minimum(_box(u + 0.45, v, 0.25, 0.9), _box(u, v - 0.65, 0.7, 0.25)),
    lambda u, v: np.minimum(np.hypot(u - 0.55, v), np.hypot(u + 0.55, v)) - 0.4,
]


class SyntheticShapes(Dataset):
    """Procedurally rendered shapes; `split` "train" and "val" are disjoint random streams."""

    classes = CLASSES
    labeled_split = "train"
    eval_split = "val"
    cache = None      # rendering is cheaper than keeping the images
    gpu_augment = None
    on_error = "raise"  # nothing can be unreadable
    num_skipped = 0

    def __init__(
        self,
        split: Literal["train", "val"],
        transform: Optional[Callable] = None,
        image_size: int = 32,
        num_train: int = 8192,
        num_val: int = 2048,
        seed: int = 0,
    ):
        if split not in _SPLIT_IDS:
            raise ConfigError(f"split: expected 'train' or 'val' for SyntheticShapes, got {split!r}")
        if image_size < 8 or num_train < 1 or num_val < 1 or seed < 0:
            raise ConfigError(
                "SyntheticShapes: expected image_size >= 8, num_train >= 1, num_val >= 1 and seed >= 0, "
                f"got {image_size}, {num_train}, {num_val}, {seed}"
            )
        self.split, self.transform, self.image_size, self.seed = split, transform, image_size, seed
        n = num_train if split == "train" else num_val
        self.targets = [i % len(CLASSES) for i in range(n)]  # balanced, known without rendering
        grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
        self._y, self._x = grid[:, None], grid[None, :]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self))[index]  # IndexError when out of range, as a Sequence
        label = self.targets[index]
        image = self.render(label, np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index]))
        return (self.transform(image) if self.transform is not None else image), label

    def render(self, label: int, rng: np.random.Generator) -> torch.Tensor:
        """Draw shape `label` with nuisances from `rng`: uint8 [3, image_size, image_size]."""
        x, y, size = self._x, self._y, self.image_size
        # Ground: dark grey with a slight tint, shading into another shade in a random direction.
        c0 = rng.uniform(0.18, 0.22, 3).astype(np.float32)
        c1 = np.clip(c0 + rng.normal(0, 0.15, 3), 0, 1).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        t = ((x * np.cos(a) + y * np.sin(a)) * 0.5 + 0.5)[..., None]
        image = c0 * (1 - t) + c1 * t
        # Shape: light grey with a slight tint.
        fg = rng.uniform(0.78, 0.82, 3).astype(np.float32)
        # Pose: scale (shape radius, in half image widths), position inside the frame, mirror.
        s = rng.uniform(0.45, 0.8)
        cx, cy = rng.uniform(-(0.95 - s), 0.95 - s, 2)
        mirror = rng.choice([-1.0, 1.0])
        u = (x - cx) / s * mirror
        v = (y - cy) / s
        # Anti-aliased coverage: one pixel is 2 / size in image units.
        alpha = np.clip(0.5 - _SHAPES[label](u, v) * s * size / 2, 0, 1)[..., None]
        if rng.random() < 0.5:  # stripes across the shape, random period and angle
            b = rng.uniform(0, np.pi)
            period = rng.uniform(0.25, 0.5)
            stripes = np.sin((x * np.cos(b) + y * np.sin(b)) * 2 * np.pi / period) > 0
            fg = fg * (1 - 0.4 * stripes[..., None])
        image = image * (1 - alpha) + fg * alpha
        image = image + rng.normal(0, 0.03, image.shape)
        out = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
        return torch.from_numpy(out).permute(2, 0, 1).contiguous()
