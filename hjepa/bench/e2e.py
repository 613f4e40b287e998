"""`e2e`: the real Trainer on a folder of JPEGs (or the prepared copy, or a decoded cache)
next to the step-only rate of the same model, measured in the same process."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hjepa.bench.common import ROOT, emit, mask_kwargs, model_kwargs, optim_kwargs, row
from hjepa.bench.data import class_tree, loader_rate, unpack_images
from hjepa.bench.step import bench_step

HELP = "the real Trainer on JPEG folders vs step only"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--copies", type=int, default=10, help="symlinks per image (a few thousand files)")
    p.add_argument("--format", default="jpeg", choices=["jpeg", "prepared"])
    p.add_argument("--cache", default="none", choices=["none", "memory", "device"])
    p.add_argument("--model", default="hjepa_vit_base")
    p.add_argument("--levels", default="ijepa", choices=["ijepa", "config"])
    p.add_argument("--arch", default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=15)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--loader-only", action="store_true", help="also the DataLoader alone, to name a bottleneck")
    p.add_argument("--device", default=None)


def run(a: argparse.Namespace) -> list[dict]:
    """The real Trainer on a folder of JPEGs (or the prepared copy, or a decoded cache), next
    to the step-only rate of the same model measured in the same process."""
    from hjepa import runs
    from hjepa.data.folder import ImageFolder
    from hjepa.data.mixture import Mixture
    from hjepa.data.prepare import prepare
    from hjepa.data.shards import PreparedDataset
    from hjepa.data.transforms import train_transform
    from hjepa.engine.device import Hardware
    from hjepa.engine.optim import Optimization
    from hjepa.engine.trainer import RunContext, Trainer
    from hjepa.loggers import Logger
    from hjepa.masks import MultiBlockMaskCollator
    from hjepa.models.hjepa import HJEPA

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flat = unpack_images(a.images, work, a.n)
        tree = class_tree(flat, work, a.n, a.copies)
        tf = train_transform(a.img, [0.3, 1.0], [3 / 4, 4 / 3], 0.0, 0.0)
        if a.format == "prepared":
            prepare(str(tree), str(work / "prepared"), workers=a.workers + 1)
            dataset = PreparedDataset(str(work / "prepared"), "train", transform=tf, cache=a.cache)
        else:
            dataset = ImageFolder(str(tree), "train", transform=tf, cache=a.cache)
        step_only = bench_step(a.model, a.levels, a.batch, a.img, a.patch, a.precision, a.compile, a.warmup,
                               a.steps, device, a.arch, None, False, None)
        rows.append(step_only), emit(rows[-1:], a.json, a.out)
        torch.manual_seed(0)
        model = HJEPA(**model_kwargs(a.model, a.img, a.patch, a.levels, a.arch))
        hardware = Hardware(device=device.type, precision=a.precision, batch_size=a.batch, num_workers=a.workers,
                            compile=a.compile)
        epoch_length = a.batch * a.train_steps
        data = Mixture({"images": dataset}, strategy="concat", epoch_length=epoch_length, seed=0)
        trainer = Trainer(epochs=1, log_every=a.log_every, checkpoint_every=10**9, resume="never")
        run_dir = work / "run"
        run_dir.mkdir()
        t = time.perf_counter()
        trainer.fit(model, Optimization(**optim_kwargs()), hardware, data,
                    MultiBlockMaskCollator(model.grid_size, **mask_kwargs()), Logger(progress=False),
                    RunContext(run_dir))
        wall = time.perf_counter() - t
        records = [json.loads(line) for line in open(run_dir / runs.METRICS)]
        rates = [r["img_per_s"] for r in records[1:]] or [records[-1]["img_per_s"]]  # the first interval warms up
        rate = statistics.median(rates)
        cfg = (f"{a.model} levels={a.levels} {a.format} {a.cache} cache, {len(dataset)} files "
               f"({a.copies} links each), {a.workers} workers, batch {a.batch}, {a.img} px, {a.precision}")
        rows.append(row("end-to-end training (Trainer)", cfg, rate, "img/s", baseline=step_only["value"],
                        baseline_of="step only, same model, same run (target: ratio >= 0.9)",
                        interval_rates=rates, wall_s=wall, steps=a.train_steps))
        emit(rows[-1:], a.json, a.out)
        if a.loader_only:
            rate = loader_rate(dataset, a.workers, a.batch)
            rows.append(row("loader only (same dataset)", f"{a.workers} workers, batch {a.batch}", rate, "img/s"))
            emit(rows[-1:], a.json, a.out)
    return rows
