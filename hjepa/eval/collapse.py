"""Collapse signals of a batch of features.

std:  the mean over dimensions of the per-dimension std of the L2-normalised features.
      Features spread evenly over the sphere give about 1/sqrt(D); a collapsed encoder
      (every image mapped to the same vector) gives 0 (SimSiam, Chen & He 2021).
rank: the effective rank of the L2-normalised features, exp of the entropy of their
      normalised singular values (RankMe, Garrido et al. 2023): between 1 (one direction)
      and D. Note that normalised pooled ViT features share a large mean direction, so even
      a random-init encoder sits far below D (about 6 for timm's test_vit, 7 for ViT-Tiny
      on the synthetic data).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_stats(features: torch.Tensor) -> dict[str, float]:
    z = F.normalize(features.double(), dim=1)
    s = torch.linalg.svdvals(z)
    p = s / s.sum()
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    return {"std": z.std(dim=0).mean().item(), "rank": entropy.exp().item()}


def collapse_warning(stats: dict[str, float], dim: int, min_std: float, min_rank: float) -> Optional[str]:
    """A warning when std < min_std / sqrt(dim) or rank < min_rank, else None."""
    std_floor = min_std / math.sqrt(dim)
    if stats["std"] >= std_floor and stats["rank"] >= min_rank:
        return None
    return (f"WARNING: the target encoder's features look collapsed: std of the normalised features "
            f"{stats['std']:.2e} (warning below {std_floor:.2e} = {min_std}/sqrt({dim}); "
            f"about {1 / math.sqrt(dim):.2e} when spread out), effective rank {stats['rank']:.2f} (warning below {min_rank}). Check the loss curve, "
            "the EMA momentum (optim.ema_momentum) and the learning rate.")
