"""`masks`: CPU time per batch of the mask collator next to a reference-style per-image loop."""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from hjepa.bench.common import emit, mask_kwargs, row

def reference_masks(batch: int, height: int, width: int, generator: torch.Generator, npred: int = 4,
                    pred_scale=(0.15, 0.2), pred_aspect=(0.75, 1.5), enc_scale=(0.85, 1.0), min_keep: int = 10,
                    max_tries: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference collator's algorithm, written from the I-JEPA description (a baseline
    for timing, not used in training): one block size per batch for the targets and one for
    the context; then a Python loop over images and over blocks, each block drawn as a
    dense HxW mask until it keeps >= min_keep patches; targets cut out of an acceptable
    region for the context; every mask truncated to the batch minimum length."""

    def block_size(scale, aspect):
        u = torch.rand(1, generator=generator).item()
        s = scale[0] + u * (scale[1] - scale[0])
        ar = aspect[0] + u * (aspect[1] - aspect[0])
        n = int(height * width * s)
        h, w = int(round(math.sqrt(n * ar))), int(round(math.sqrt(n / ar)))
        return min(h, height - 1), min(w, width - 1)

    def sample_block(h, w, acceptable=None):
        tries, valid = 0, False
        while not valid:
            top = torch.randint(0, height - h, (1,), generator=generator).item()
            left = torch.randint(0, width - w, (1,), generator=generator).item()
            mask = torch.zeros((height, width), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if acceptable is not None:
                for region in acceptable[: max(0, len(acceptable) - tries // max_tries)]:
                    mask *= region
            idx = torch.nonzero(mask.flatten()).squeeze()
            valid = idx.numel() > min_keep
            tries += 1
        complement = torch.ones((height, width), dtype=torch.int32)
        complement[top:top + h, left:left + w] = 0
        return idx, complement

    ph, pw = block_size(pred_scale, pred_aspect)
    eh, ew = block_size(enc_scale, (1.0, 1.0))
    preds, encs = [], []
    min_pred, min_enc = height * width, height * width
    for _ in range(batch):
        masks_p, regions = [], []
        for _ in range(npred):
            idx, complement = sample_block(ph, pw)
            masks_p.append(idx), regions.append(complement)
            min_pred = min(min_pred, idx.numel())
        preds.append(masks_p)
        idx, _ = sample_block(eh, ew, acceptable=regions)
        encs.append(idx)
        min_enc = min(min_enc, idx.numel())
    targets = torch.stack([torch.stack([m[:min_pred] for m in ms]) for ms in preds])
    context = torch.stack([m[:min_enc] for m in encs])
    return context, targets

HELP = "mask collator time per batch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--grid", type=int, default=14)
    p.add_argument("--repeats", type=int, default=100)


def run(a: argparse.Namespace) -> list[dict]:
    from hjepa.masks import MultiBlockMaskCollator

    torch.set_num_threads(1)
    grid = (a.grid, a.grid)
    collator = MultiBlockMaskCollator(grid, **mask_kwargs())
    g = torch.Generator().manual_seed(0)

    def per_batch_ms(fn, n) -> float:
        fn()
        t = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t) / n * 1e3

    ours, ref = [], []
    for _ in range(3):  # interleaved rounds, median: the machine may be shared
        ours.append(per_batch_ms(lambda: collator.sample(a.batch, g), a.repeats))
        ref.append(per_batch_ms(lambda: reference_masks(a.batch, *grid, g), max(2, a.repeats // 20)))
    o, r = statistics.median(ours), statistics.median(ref)
    cfg = f"batch {a.batch}, {a.grid}x{a.grid} grid, 1 thread, CPU ms per batch (process time)"
    rows = [row("mask collator (reference per-image loop)", cfg, r, "ms/batch"),
            row("mask collator (ours, vectorised)", cfg, o, "ms/batch", baseline=r,
                baseline_of="reference-style per-image loop, same run", higher_is_better=False)]
    emit(rows, a.json, a.out)
    return rows
