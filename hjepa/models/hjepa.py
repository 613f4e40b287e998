"""H-JEPA: I-JEPA with a loss at several levels of depth and spatial granularity.

Level k = (depth_k, stride_k, weight_k). Its target is the target encoder's block-depth_k
output under a parameter-free LayerNorm ("last" = the final norm output, as in I-JEPA);
its prediction is head_k of the predictor output. Stride s groups the patch grid into
s x s cells (cells of the whole grid, not of the block); within each target block, the
prediction and the target of a cell are the means over the block's patches in that cell,
so both always cover the same patches. loss_k = mean over target blocks of the mean over
that block's cells of smooth-L1 (or MSE) averaged over features; the total is
sum_k weight_k * loss_k. ``levels=[{depth: last, stride: 1, weight: 1}]`` is exactly I-JEPA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hjepa.errors import ConfigError
from hjepa.models.predictor import Predictor
from hjepa.models.vit import Depth, check_init, create_encoder, encode_context, encode_targets, gather_tokens


@dataclass(frozen=True)
class Level:
    depth: Depth
    stride: int
    weight: float


def parse_levels(levels: list[dict], num_blocks: int, grid_size: tuple[int, int]) -> list[Level]:
    if not levels:
        raise ConfigError("model.levels: expected at least one level {depth, stride, weight}")
    parsed = []
    for k, spec in enumerate(levels):
        where = f"model.levels[{k}]"
        if not isinstance(spec, Mapping) or set(spec) != {"depth", "stride", "weight"}:  # dict or DictConfig
            raise ConfigError(f"{where}: expected exactly the keys depth, stride, weight; got {spec!r}")
        depth, stride, weight = spec["depth"], spec["stride"], spec["weight"]
        if not (depth == "last" or (type(depth) is int and 1 <= depth <= num_blocks)):
            raise ConfigError(f"{where}.depth: expected 'last' or a block number in 1..{num_blocks}, got {depth!r}")
        if type(stride) is not int or not 1 <= stride <= max(grid_size):
            raise ConfigError(
                f"{where}.stride: expected an int in 1..{max(grid_size)} (the patch grid is "
                f"{grid_size[0]}x{grid_size[1]}), got {stride!r}"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
        parsed.append(Level(depth, stride, float(weight)))
    if not any(level.weight > 0 for level in parsed):
        raise ConfigError("model.levels: all weights are 0, so there is nothing to train")
    return parsed


def cell_slots(targets: Tensor, grid_width: int, stride: int) -> tuple[Tensor, Tensor]:
    """Group each target block's patches by their stride x stride cell of the patch grid.

    targets [..., M] (row-major patch indices) -> (slot [..., M], counts [..., M]): slot is
    the index (0..M-1) of the patch's cell among the cells its block touches; counts[j] is
    the number of the block's patches in slot j (0 for unused slots). Sort-based, so it is
    vectorised over all blocks at once.
    """
    cells_per_row = -(-grid_width // stride)
    cell = (targets // grid_width // stride) * cells_per_row + (targets % grid_width) // stride
    sorted_cell, order = cell.sort(dim=-1)
    new = torch.ones_like(sorted_cell, dtype=torch.bool)
    new[..., 1:] = sorted_cell[..., 1:] != sorted_cell[..., :-1]
    slot = torch.empty_like(cell).scatter_(-1, order, new.cumsum(-1) - 1)
    counts = torch.zeros_like(cell).scatter_add_(-1, slot, torch.ones_like(cell))
    return slot, counts


def pool_cells(x: Tensor, slot: Tensor, counts: Tensor) -> Tensor:
    """Mean of x [..., M, D] over the patches of each slot -> [..., M, D] (zeros in unused slots)."""
    sums = torch.zeros_like(x).scatter_add_(-2, slot.unsqueeze(-1).expand_as(x), x)
    return sums / counts.clamp(min=1).unsqueeze(-1).to(x.dtype)


class HJEPA(nn.Module):
    def __init__(
        self,
        arch: str,
        img_size: int,
        patch_size: int,
        levels: list[dict],
        predictor_dim: int = 384,
        predictor_depth: int = 6,
        predictor_heads: int = 6,
        drop_path_rate: float = 0.0,
        loss: Literal["smooth_l1", "mse"] = "smooth_l1",
        init: Literal["rescaled", "reference"] = "rescaled",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        check_init(init)
        if loss not in ("smooth_l1", "mse"):
            raise ConfigError(f"model.loss: expected 'smooth_l1' or 'mse', got {loss!r}")
        if predictor_depth < 1 or predictor_dim < 1 or predictor_heads < 1 or predictor_dim % predictor_heads:
            raise ConfigError(
                f"model.predictor_*: need depth >= 1 and a width divisible by the number of heads, "
                f"got depth {predictor_depth}, width {predictor_dim}, heads {predictor_heads}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate: expected a value in [0, 1), got {drop_path_rate}")
        self.encoder = create_encoder(arch, img_size, patch_size, drop_path_rate, init)
        self.levels = parse_levels(levels, len(self.encoder.blocks), self.grid_size)
        self.depths = sorted({level.depth for level in self.levels}, key=str)
        self.loss_fn = F.smooth_l1_loss if loss == "smooth_l1" else F.mse_loss
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False).eval()
        # Activation checkpointing of the context encoder's and the predictor's blocks (the
        # target encoder runs without gradients, so it keeps no activations anyway).
        self.grad_checkpointing = grad_checkpointing
        self.predictor = Predictor(
            self.encoder.embed_dim, self.grid_size, predictor_dim, predictor_depth, predictor_heads, len(self.levels),
            init, grad_checkpointing,
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def train(self, mode: bool = True) -> HJEPA:
        super().train(mode)
        self.target_encoder.eval()  # targets carry no drop-path / dropout noise
        return self

    def forward(self, images: Tensor, context: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """images [B, 3, H, W] normalised; context [B, K] and targets [B, T, M] patch indices."""
        B, T, M = targets.shape
        flat = targets.reshape(B, T * M)
        with torch.no_grad():
            features = encode_targets(self.target_encoder, images, self.depths)
            target = {d: gather_tokens(f, flat).reshape(B, T, M, -1) for d, f in features.items()}
        predictions = self.predictor(self.encode_context(images, context), context, targets)

        slots = {s: cell_slots(targets, self.grid_size[1], s) for s in {level.stride for level in self.levels} if s > 1}
        out, total = {}, 0.0
        for k, (level, pred) in enumerate(zip(self.levels, predictions)):
            # float32 also under autocast: bf16 rounding (~0.4%) is not small next to late-training errors.
            pred, tgt = pred.float(), target[level.depth].float()
            if level.stride == 1:  # one patch per cell: I-JEPA's loss, mean over all elements
                loss = self.loss_fn(pred, tgt)
            else:
                slot, counts = slots[level.stride]
                per_cell = self.loss_fn(pool_cells(pred, slot, counts), pool_cells(tgt, slot, counts), reduction="none")
                # unused slots are zero in both, so they add 0 to the sum; divide by used cells
                per_block = per_cell.mean(-1).sum(-1) / (counts > 0).sum(-1)
                loss = per_block.mean()
            total = total + level.weight * loss
            out[f"loss/level{k}"] = loss.detach()
        return {"loss": total, **out}

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, after optimizer.step()."""
        target, online = list(self.target_encoder.parameters()), list(self.encoder.parameters())
        torch._foreach_lerp_(target, online, 1.0 - momentum)
        for t, o in zip(self.target_encoder.buffers(), self.encoder.buffers()):
            t.copy_(o)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """The target encoder's final normed tokens [B, N, D] (average-pool them for probes)."""
        return self.target_encoder.forward_features(images)

    def encode_context(self, images: Tensor, context: Tensor) -> Tensor:
        return encode_context(self.encoder, images, context, self.grad_checkpointing)
