"""The predictor: a narrow ViT that predicts target-block features from the context.

As in I-JEPA: context tokens are projected to the predictor width and given their
(fixed, sin-cos) positions; each target position gets one shared learned mask token plus
its position. Each target block is predicted in its own sequence (the context is repeated
once per block), so target blocks never attend to each other and every sequence has the
same length, which keeps attention a dense SDPA call. After the final LayerNorm there is
one linear head per level, mapping back to the encoder width; with a single level this is
I-JEPA's ``predictor_proj``.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from hjepa.models.vit import check_init, enable_sdpa, rescale_residual_init, run_blocks, sincos_pos_embed_2d


class Predictor(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        dim: int,
        depth: int,
        num_heads: int,
        num_levels: int,
        init: str = "rescaled",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        check_init(init)
        self.grad_checkpointing = grad_checkpointing  # recompute block activations in backward
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed, so not a parameter; rebuilt at construction, so not in the state_dict.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid_size), persistent=False)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.heads = nn.ModuleList([nn.Linear(dim, embed_dim) for _ in range(num_levels)])

        # Truncated normal (std 0.02) weights and mask token, zero biases; init=rescaled then
        # divides the residual outputs by sqrt(2 * layer), init=reference keeps them (its
        # helper re-initialises every Linear after the model class rescaled them).
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if init == "rescaled":
            rescale_residual_init(self.blocks)
        enable_sdpa(self)

    def forward(self, x: Tensor, context: Tensor, targets: Tensor) -> list[Tensor]:
        """x: encoded context [B, K, embed_dim]; context: its patch indices [B, K];
        targets: patch indices [B, T, M]. Returns one [B, T, M, embed_dim] per level."""
        B, T, M = targets.shape
        K = context.shape[1]
        x = self.embed(x) + self.pos_embed[context]
        x = x.repeat_interleave(T, dim=0)  # [B*T, K, dim]: block t of image b is row b*T + t
        queries = self.mask_token + self.pos_embed[targets.reshape(B * T, M)]
        x = torch.cat([x, queries], dim=1)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.norm(x[:, K:]).reshape(B, T, M, -1)
        return [head(x) for head in self.heads]
