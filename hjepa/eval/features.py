"""Frozen features of the target encoder (eval mode, eval transform), and their disk cache.

Three kinds, all computed from the stock timm encoder (`HJEPA.target_encoder`):
  pooled  the final normed tokens averaged over tokens [N, D] (the I-JEPA protocol;
          `HJEPA.features(x).mean(1)`, and what the exported timm model returns);
  last4   the outputs of the last 4 blocks, each under the encoder's final LayerNorm,
          averaged over tokens and concatenated [N, 4D] (DINO / I-JEPA's "last 4 layers");
  tokens  the final normed tokens themselves [N, T, D], stored as float16 (attentive probe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hjepa.data.transforms import normalize
from hjepa.atomic import atomic_write

Kind = Literal["pooled", "last4", "tokens"]


def encode(encoder: nn.Module, images: Tensor, kind: Kind) -> Tensor:
    """Features of a batch of normalised images (see the module docstring)."""
    if kind == "last4":
        blocks = encoder.forward_intermediates(images, indices=4, norm=True, output_fmt="NLC", intermediates_only=True)
        return torch.cat([b.mean(dim=1) for b in blocks], dim=1)
    tokens = encoder.forward_features(images)
    return tokens.mean(dim=1) if kind == "pooled" else tokens


@torch.no_grad()
def extract(encoder: nn.Module, dataset: Dataset, kind: Kind, device: torch.device, batch_size: int = 256,
            num_workers: int = 0, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            progress: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(features on the CPU, labels [N]) for every item of `dataset` (uint8 images). With
    `progress` (a description), says what it extracts, with a progress bar on a terminal."""
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    dtype = torch.float16 if kind == "tokens" else torch.float32  # tokens: half the disk and memory
    out, labels, n = None, torch.empty(len(dataset), dtype=torch.long), 0
    if progress:
        print(f"extracting features: {progress}", flush=True)
        loader = tqdm(loader, desc="features", unit="batch", disable=None, leave=False)  # disable=None: only on a TTY
    for images, y in loader:
        with autocast():
            f = encode(encoder, normalize(images.to(device, non_blocking=True)), kind)
        if out is None:  # filled in place: no second copy of a large token cache
            out = torch.empty((len(dataset), *f.shape[1:]), dtype=dtype)
        out[n:n + len(f)] = f.to("cpu", dtype)
        labels[n:n + len(f)] = torch.as_tensor(y)
        n += len(f)
    encoder.train(was_training)
    return out, labels


def cached(cache_dir: Path, key: dict, compute: Callable[[], tuple[Tensor, Tensor]],
           on_hit: Callable[[], None] = lambda: None) -> tuple[Tensor, Tensor]:
    """`compute()`, stored under a file named by a hash of `key`; the key is stored too and
    compared on load, so anything that changes the features (checkpoint step, dataset
    config, split, transform, kind, subset) misses the cache instead of reusing it."""
    text = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir) / f"{key.get('kind', 'features')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["key"] == text:
                on_hit()
                return state["features"], state["labels"]
        except Exception:  # unreadable or from another version: recompute and overwrite
            pass
    features, labels = compute()
    atomic_write(path, lambda f: torch.save({"key": text, "features": features, "labels": labels}, f))
    return features, labels
