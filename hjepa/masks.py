"""I-JEPA multi-block masks, vectorised over the batch.

Per batch, one target block size and one context block size are drawn (as the reference
does, so all target blocks of a batch have the same number of patches); per image,
`num_targets` target blocks and one context block are placed at random on the patch grid,
and the context is the context block minus the union of the targets (unless
`allow_overlap`). Every context is then cut to the batch minimum K so that a batch is one
index tensor. Indices are into the row-major flattened patch grid.

`geometry` chooses between two samplers:

* ``unbiased`` (this project's): scale and aspect ratio drawn independently; a block may sit
  at any offset 0..H-h (and span the whole grid); images whose context keeps fewer than
  `min_keep` patches are resampled (targets and context); each image keeps a uniformly random
  K-subset of its context patches (sorted), so truncation has no spatial bias.
* ``reference`` (facebookresearch/ijepa's MaskCollator, re-implemented): one shared random
  number sets both the scale and the aspect ratio of a block (large blocks are always the
  tall ones); blocks are at most (H-1) x (W-1) and their offsets are drawn with the exclusive
  bound randint(0, H - h), so no block touches the last row or column; a context keeping
  `min_keep` or fewer patches has its block re-placed (targets kept), and after 20 failed
  tries it stops excluding the last target, then the one before, ...; every context keeps
  its first K indices, i.e. the top rows. On an 8x8 grid (32 px, patch 4) this puts the
  context block always at the top-left 7x7 and leaves ~14 context patches per image
  against ~22 for ``unbiased``.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from hjepa.data.batch import Batch, Item
from hjepa.errors import ConfigError

MAX_TRIES = 100  # resampling rounds for contexts below min_keep before giving up
REFERENCE_TRIES = 20  # geometry=reference: context re-placements before one target exclusion is dropped
GEOMETRIES = ("unbiased", "reference")


def _check_range(name: str, values: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(values) != 2 or not low < values[0] <= values[1] <= high:
        raise ConfigError(f"mask.{name}: expected [min, max] with {low} < min <= max <= {high}, got {list(values)}")
    return float(values[0]), float(values[1])


class MultiBlockMaskCollator:
    def __init__(
        self,
        grid_size: tuple[int, int],
        num_targets: int = 4,
        target_scale: list[float] = (0.15, 0.2),
        target_aspect: list[float] = (0.75, 1.5),
        context_scale: list[float] = (0.85, 1.0),
        context_aspect: list[float] = (1.0, 1.0),
        min_keep: int = 10,
        allow_overlap: bool = False,
        geometry: Literal["unbiased", "reference"] = "unbiased",
    ):
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ConfigError(f"mask: grid_size must be two positive ints, got {grid_size}")
        if geometry not in GEOMETRIES:
            raise ConfigError(f"mask.geometry: expected one of {', '.join(GEOMETRIES)}, got {geometry!r}")
        if geometry == "reference" and min(grid_size) < 2:
            raise ConfigError(f"mask.geometry=reference needs a patch grid of at least 2x2, got {tuple(grid_size)}")
        self.geometry = geometry
        self.reference = geometry == "reference"
        if num_targets < 1 or min_keep < 1:
            raise ConfigError(f"mask: num_targets and min_keep must be >= 1, got {num_targets} and {min_keep}")
        self.height, self.width = int(grid_size[0]), int(grid_size[1])
        self.num_targets, self.min_keep, self.allow_overlap = num_targets, min_keep, allow_overlap
        self.target_scale = _check_range("target_scale", target_scale, 0.0, 1.0)
        self.target_aspect = _check_range("target_aspect", target_aspect, 0.0, math.inf)
        self.context_scale = _check_range("context_scale", context_scale, 0.0, 1.0)
        self.context_aspect = _check_range("context_aspect", context_aspect, 0.0, math.inf)
        n = self.height * self.width
        grid = f"the {self.height}x{self.width} patch grid"
        if int(n * self.target_scale[0]) < 1:
            raise ConfigError(
                f"mask.target_scale: {grid} is too small: a target block of scale {self.target_scale[0]} "
                f"holds int({n} * {self.target_scale[0]}) = 0 patches (use larger images or smaller patches)"
            )
        if int(n * self.context_scale[1]) < min_keep:
            raise ConfigError(
                f"mask.min_keep: a context block on {grid} holds at most {int(n * self.context_scale[1])} "
                f"patches, fewer than min_keep={min_keep}"
            )

    def _block_size(self, scale: tuple[float, float], aspect: tuple[float, float], u: float, v: float) -> tuple[int, int]:
        """A block of (scale * grid) patches with height/width ~ aspect, as in the reference
        (which also caps blocks at (H-1) x (W-1); `unbiased` allows the whole grid)."""
        area = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
        ratio = aspect[0] + v * (aspect[1] - aspect[0])
        h = round(math.sqrt(area * ratio))
        w = round(math.sqrt(area / ratio))
        cap = 1 if self.reference else 0
        return min(max(h, 1), self.height - cap), min(max(w, 1), self.width - cap)

    def _blocks(self, shape: tuple[int, ...], h: int, w: int, generator: torch.Generator) -> Tensor:
        """Randomly placed h x w blocks: shape + (h * w,) patch indices, row-major. Offsets are
        uniform over 0..H-h (`unbiased`) or 0..H-h-1 (`reference`: randint's exclusive bound)."""
        end = 0 if self.reference else 1
        top = torch.randint(0, self.height - h + end, shape + (1, 1), generator=generator)
        left = torch.randint(0, self.width - w + end, shape + (1, 1), generator=generator)
        rows = top + torch.arange(h).view(h, 1)
        cols = left + torch.arange(w).view(1, w)
        return (rows * self.width + cols).reshape(shape + (h * w,))

    def sample_blocks(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The untruncated masks: (context BoolTensor[B, N], targets LongTensor[B, T, M]).
        ``sample`` starts with exactly this call, then equalises the context lengths."""
        if self.reference:
            return self._sample_blocks_reference(batch_size, generator)
        u = torch.rand(4, generator=generator).tolist()
        th, tw = self._block_size(self.target_scale, self.target_aspect, u[0], u[1])
        ch, cw = self._block_size(self.context_scale, self.context_aspect, u[2], u[3])
        B, T, N = batch_size, self.num_targets, self.height * self.width
        targets = torch.empty(B, T, th * tw, dtype=torch.long)
        context = torch.empty(B, N, dtype=torch.bool)
        todo = torch.arange(B)  # images still to (re)sample
        for _ in range(MAX_TRIES):
            n = len(todo)
            tgt = self._blocks((n, T), th, tw, generator)
            ctx = torch.zeros(n, N, dtype=torch.bool).scatter_(1, self._blocks((n,), ch, cw, generator), True)
            if not self.allow_overlap:
                ctx.scatter_(1, tgt.reshape(n, -1), False)
            targets[todo], context[todo] = tgt, ctx
            todo = todo[ctx.sum(1) < self.min_keep]
            if len(todo) == 0:
                return context, targets
        raise ConfigError(
            f"mask: after {MAX_TRIES} tries some contexts still keep fewer than min_keep={self.min_keep} "
            f"patches ({ch}x{cw} context block, {T} target blocks of {th}x{tw} on a "
            f"{self.height}x{self.width} grid); lower min_keep, num_targets or target_scale"
        )

    def _sample_blocks_reference(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``sample_blocks`` by the reference's rules (see the module docstring)."""
        u = torch.rand(2, generator=generator).tolist()  # one number per block size: scale and aspect
        th, tw = self._block_size(self.target_scale, self.target_aspect, u[0], u[0])
        ch, cw = self._block_size(self.context_scale, self.context_aspect, u[1], u[1])
        B, T, N = batch_size, self.num_targets, self.height * self.width
        targets = self._blocks((B, T), th, tw, generator)
        context = torch.empty(B, N, dtype=torch.bool)
        todo = torch.arange(B)  # images whose context is still to (re)place
        for relaxed in range(T + 1):  # exclude the first T - relaxed targets from the context
            excluded = torch.zeros(B, N, dtype=torch.bool)
            if not self.allow_overlap and relaxed < T:
                excluded.scatter_(1, targets[:, : T - relaxed].reshape(B, -1), True)
            for _ in range(REFERENCE_TRIES):
                n = len(todo)
                ctx = torch.zeros(n, N, dtype=torch.bool).scatter_(1, self._blocks((n,), ch, cw, generator), True)
                ctx &= ~excluded[todo]
                context[todo] = ctx
                todo = todo[ctx.sum(1) <= self.min_keep]  # the reference keeps a context of > min_keep
                if len(todo) == 0:
                    return context, targets
        raise ConfigError(
            f"mask: a {ch}x{cw} context block keeps at most {ch * cw} patches, not more than "
            f"min_keep={self.min_keep} (geometry=reference on the {self.height}x{self.width} grid); "
            "lower min_keep or raise context_scale"
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(context LongTensor[B, K], targets LongTensor[B, T, M]); K is the batch minimum of
        the context sizes, each image keeping a uniformly random K-subset (`unbiased`) or its
        first K indices (`reference`), sorted."""
        context, targets = self.sample_blocks(batch_size, generator)
        k = int(context.sum(1).min())
        if self.reference:  # context indices first, in ascending order: keep the first k
            n = context.shape[1]
            index = torch.arange(n).expand_as(context)
            return torch.where(context, index, index + n).sort(dim=1).values[:, :k], targets
        # Random keys, non-context patches last: the k smallest are a uniform k-subset.
        keys = torch.rand(context.shape, generator=generator).masked_fill_(~context, 2.0)
        keep = keys.topk(k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
        return keep, targets

    def __call__(self, items: list[Item]) -> Batch:
        """Stack the items and add their masks. The masks are seeded by the first item's key
        when there is one, so they follow the data stream whatever the number of loader
        workers; otherwise by the global torch RNG."""
        generator = torch.Generator()
        key = items[0].key
        generator.manual_seed(int(key) if key is not None else int(torch.randint(2**62, ())))
        context, targets = self.sample(len(items), generator)
        return Batch.collate(items, context, targets)


TARGET_COLOURS = np.array([[230, 60, 60], [60, 160, 230], [250, 200, 40], [150, 80, 220], [60, 200, 120]])


def mask_picture(images: Tensor, context: Tensor, targets: Tensor,
                 grid: tuple[int, int], max_images: int = 8, min_side: int = 128) -> np.ndarray:
    """A row of images with the context patches shown as is, target blocks tinted by block
    and everything else (neither context nor target) dimmed."""
    n = min(max_images, images.shape[0])
    gh, gw = grid
    tiles = []
    for i in range(n):
        img = images[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
        h, w = img.shape[:2]
        ph, pw = h // gh, w // gw
        shade = np.full(gh * gw, 0.25, dtype=np.float32)
        shade[context[i].cpu().numpy()] = 1.0
        tint = np.zeros((gh * gw, 3), dtype=np.float32)
        for t, block in enumerate(targets[i].cpu().numpy()):
            tint[block] = TARGET_COLOURS[t % len(TARGET_COLOURS)]
            shade[block] = np.where(shade[block] == 1.0, 1.0, 0.55)
        per_pixel = np.repeat(np.repeat(shade.reshape(gh, gw), ph, 0), pw, 1)[..., None]
        tint_px = np.repeat(np.repeat(tint.reshape(gh, gw, 3), ph, 0), pw, 1)
        has_tint = tint_px.sum(-1, keepdims=True) > 0
        out = img[: gh * ph, : gw * pw] * per_pixel
        out = np.where(has_tint, 0.55 * out + 0.45 * tint_px, out)
        scale = max(1, -(-min_side // out.shape[0]))
        out = np.repeat(np.repeat(out, scale, 0), scale, 1)
        tiles.append(np.pad(out, ((2, 2), (2, 2), (0, 0)), constant_values=255))
    return np.concatenate(tiles, axis=1).clip(0, 255).astype(np.uint8)
