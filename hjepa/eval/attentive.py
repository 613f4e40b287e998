"""`eval=attentive`: the V-JEPA attentive probe (Bardes et al. 2024) on frozen tokens.

One learned query cross-attends over the encoder's final normed tokens (pre-norm on the
tokens, a residual MLP on the query, as V-JEPA's AttentivePooler with depth 1), then a
linear classifier reads the query.

Token caches are large (ViT-S/16 at 224 px: 196 x 384 float16 = 150 kB per image, 19 GB
for ImageNet-100's train split), so each split's cache is capped at `max_cache_gb`: a
larger split is replaced by a seeded, class-stratified subset of the images that fit,
and the result json records the numbers of images actually used.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from hjepa.errors import ConfigError
from hjepa.eval.probe import Features, ProbeTraining


class AttentiveClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, num_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        kv = self.norm1(tokens)
        q = self.query.expand(len(tokens), -1, -1)
        q = q + self.attn(q, kv, kv, need_weights=False)[0]
        q = q + self.mlp(self.norm2(q))
        return self.head(q[:, 0])


class AttentiveProbe:
    name, kind = "attentive", "tokens"

    def __init__(
        self,
        num_heads: Optional[int] = None,
        lrs: Sequence[float] = (3e-4, 1e-3, 3e-3),
        epochs: int = 20,
        batch_size: int = 256,
        weight_decay: float = 0.01,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_cache_gb: float = 4.0,
    ):
        if (num_heads is not None and num_heads < 1) or not max_cache_gb > 0:
            raise ConfigError(f"eval: expected num_heads >= 1 (or null) and max_cache_gb > 0, "
                              f"got {num_heads}, {max_cache_gb}")
        self.num_heads, self.max_cache_gb = num_heads, max_cache_gb
        self.training = ProbeTraining(list(lrs), epochs, batch_size, weight_decay, val_fraction, seed)

    def settings(self) -> dict:
        return {"num_heads": self.num_heads, "max_cache_gb": self.max_cache_gb, **vars(self.training)}

    def max_images(self, tokens: int, dim: int) -> int:
        """How many images' float16 tokens fit in max_cache_gb."""
        return max(1, int(self.max_cache_gb * 2**30) // (tokens * dim * 2))

    def __call__(self, train: Features, test: Features, num_classes: int, device: torch.device) -> dict:
        dim = train[0].shape[-1]
        heads = self.num_heads or max(1, dim // 64)  # timm ViTs use 64 channels per head
        if dim % heads:
            raise ConfigError(f"eval.num_heads={heads} does not divide the feature width {dim}")
        return self.training.fit_and_score(lambda: AttentiveClassifier(dim, num_classes, heads), train, test, device)
