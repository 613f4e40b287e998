"""`loader`: the training input pipeline alone, in img/s: sampler -> loader workers -> mask
collator -> `Mixture.to_device` (images on the device), for raw JPEGs decoded on the CPU
(`decode: cpu`), raw JPEGs decoded on the GPU (`decode: gpu`), and the prepared format.

    python -m hjepa.bench loader --images pack.tar --n 125 --copies 40 --workers 15        # on the GPU machine
    python -m hjepa.bench loader --n 8 --copies 2 --workers 1 --batch 4 --batches 2 --size 64   # CPU logic check

The same train transform as conf/transform/ijepa.yaml (RandomResizedCrop 0.3-1.0 to --size,
no flip, no jitter), batch --batch, persistent workers with one torch thread each, prefetch 4,
pinned memory on CUDA; --warmup batches, then img/s over --batches batches, the device
synchronised at the end (decoding on the GPU runs in the training process, so it counts).
The files are `--copies` symlinks to each of --n images, so the page cache holds them all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from hjepa.bench.common import ROOT, emit, row, sync

HELP = "input pipeline img/s: raw JPEGs decoded on the CPU or the GPU, and the prepared format"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"),
                   help="a flat folder of JPEGs or a .tar of them")
    p.add_argument("--n", type=int, default=125, help="images used")
    p.add_argument("--copies", type=int, default=40, help="symlinks per image")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=15)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pipelines", default="jpeg_cpu,jpeg_gpu,prepared",
                   help="any of jpeg_cpu, jpeg_gpu, prepared, prepared_gpu (comma-separated)")
    p.add_argument("--device", default=None)


def pipeline_rate(dataset, device: torch.device, workers: int, batch: int, batches: int, warmup: int,
                  grid: tuple[int, int]) -> float:
    """img/s of the Trainer's input path for `dataset` (the Trainer's DataLoader settings)."""
    from torch.utils.data import DataLoader

    from hjepa.bench.common import mask_kwargs
    from hjepa.data.mixture import Mixture, MixtureSampler
    from hjepa.engine.trainer import _worker_init
    from hjepa.masks import MultiBlockMaskCollator

    need = (batches + warmup) * batch
    mixture = Mixture({"images": dataset}, strategy="concat", epoch_length=max(need, len(dataset)), seed=0)
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_worker_init)
    if workers:
        kw.update(persistent_workers=True, prefetch_factor=4)
    loader = DataLoader(mixture, batch_size=batch, sampler=MixtureSampler(mixture, seed=0), drop_last=True,
                        collate_fn=MultiBlockMaskCollator(grid, **mask_kwargs()), **kw)
    it = iter(loader)
    for _ in range(warmup):
        mixture.to_device(next(it), device)
    sync(device)
    t = time.perf_counter()
    for _ in range(batches):
        out = mixture.to_device(next(it), device)
    sync(device)
    rate = batches * batch / (time.perf_counter() - t)
    assert out.images.shape == (batch, 3, *dataset_size(dataset)), out.images.shape
    return rate


def dataset_size(dataset) -> tuple[int, int]:
    crop = dataset.transform.transforms[0] if hasattr(dataset.transform, "transforms") else dataset.transform
    return tuple(crop.size)


def run(a: argparse.Namespace) -> list[dict]:
    from hjepa.bench.data import class_tree, our_transform, unpack_images
    from hjepa.data.folder import ImageFolder
    from hjepa.data.prepare import prepare
    from hjepa.data.shards import PreparedDataset

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted = [p for p in a.pipelines.split(",") if p]
    unknown = set(wanted) - {"jpeg_cpu", "jpeg_gpu", "prepared", "prepared_gpu"}
    if unknown:
        raise SystemExit(f"--pipelines: unknown {sorted(unknown)}")
    grid = (a.size // a.patch, a.size // a.patch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flat = unpack_images(a.images, work, a.n)
        tree = class_tree(flat, work, a.n, a.copies)
        tf = our_transform(a.size)
        files = sum(1 for _ in tree.rglob("*") if _.is_symlink() or _.is_file())
        pixels = _mean_megapixels(flat, a.n)
        names = {"jpeg_cpu": "raw JPEGs, decoded on the CPU in the loader workers (decode: cpu)",
                 "jpeg_gpu": f"raw JPEGs, decoded on the {device.type.upper()} (decode: gpu)",
                 "prepared": "prepared format (short side 256), decoded on the CPU",
                 "prepared_gpu": f"prepared format, decoded on the {device.type.upper()} (decode: gpu)"}
        prepared_dir = None
        for name in wanted:
            try:
                if name.startswith("prepared") and prepared_dir is None:
                    prepared_dir = work / "prepared"
                    t = time.perf_counter()
                    prepare(str(tree), str(prepared_dir), workers=max(1, a.workers), verify=False)
                    print(f"prepared {files} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
                decode = "gpu" if name.endswith("gpu") else "cpu"
                if name.startswith("jpeg"):
                    dataset = ImageFolder(str(tree), "train", transform=tf, decode=decode)
                else:
                    dataset = PreparedDataset(str(prepared_dir), "train", transform=tf, decode=decode)
                rate = pipeline_rate(dataset, device, a.workers, a.batch, a.batches, a.warmup, grid)
                r = row(f"loader: {names[name]}", f"{a.n} ImageNet JPEGs x {a.copies} links ({files} files, "
                        f"mean {pixels:.2f} MP), {a.workers} workers, batch {a.batch}, {a.size} px RRC(0.3-1)",
                        rate, "img/s", pipeline=name, workers=a.workers, batch=a.batch, size=a.size,
                        batches=a.batches, mean_megapixels=pixels)
            except Exception as e:  # one failing pipeline must not lose the others
                r = row(f"loader: {names[name]}", f"{a.workers} workers", float("nan"), "img/s", pipeline=name,
                        error=f"{type(e).__name__}: {str(e)[:500]}")
            base = next((b["value"] for b in rows if b["pipeline"] == "jpeg_cpu" and not b.get("error")), None)
            if base and not r.get("error"):
                r.update(baseline=base, baseline_of="raw JPEGs decoded on the CPU, same run", ratio=r["value"] / base)
            rows.append(r)
            emit([r], a.json, a.out)
    return rows


def _mean_megapixels(folder: Path, n: int) -> float:
    from PIL import Image

    from hjepa.data.folder import list_images

    files = list_images(folder)[:n]
    total = 0.0
    for f in files:
        with Image.open(f) as im:
            total += im.size[0] * im.size[1] / 1e6
    return total / max(1, len(files))
