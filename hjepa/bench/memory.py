"""`memory`: the Trainer's training step with activation checkpointing off and on
(model.grad_checkpointing): peak device memory (torch.cuda.max_memory_allocated; not
measured on a CPU or MPS device) and img/s of each, and the ratios.

    python -m hjepa.bench memory --models hjepa_vit_small --batch 64 --precision bf16
    python -m hjepa.bench memory --models hjepa_vit_micro --img 32 --patch 4 --batch 8 --precision fp32   # CPU
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hjepa.bench.common import emit, mask_kwargs, model_kwargs, optim_kwargs, row, sync, time_steps

HELP = "peak memory and speed of the training step with and without activation checkpointing"
NOT_MEASURED = "not measured"


def measure(model_name: str, levels: str, batch: int, img: int, patch: int, precision: str, grad_checkpointing: bool,
            warmup: int, steps: int, device: torch.device) -> dict:
    """One configuration: median seconds per step, and on CUDA the peak memory allocated
    during the steps after the first (whose optimizer state then exists) and the resting
    memory (model, optimizer state) before them, in GiB."""
    from hjepa.data.transforms import normalize
    from hjepa.engine.device import Hardware
    from hjepa.engine.optim import Optimization
    from hjepa.engine.step import forward_backward, optimizer_update
    from hjepa.masks import MultiBlockMaskCollator
    from hjepa.models.hjepa import HJEPA

    if device.type == "cuda":
        torch.cuda.empty_cache()  # the other setting's model was freed on return: start from a clean pool
    torch.manual_seed(0)
    kwargs = {**model_kwargs(model_name, img, patch, levels), "grad_checkpointing": grad_checkpointing}
    model = HJEPA(**kwargs).to(device).train()
    hardware = Hardware(device=device.type, precision=precision, batch_size=batch, num_workers=0)
    optimization = Optimization(**optim_kwargs())
    optimizer = optimization.build(model, fused=device.type == "cuda")
    scaler = hardware.grad_scaler()
    collator = MultiBlockMaskCollator(model.grid_size, **mask_kwargs())
    g = torch.Generator().manual_seed(0)
    masks = [tuple(t.to(device) for t in collator.sample(batch, g)) for _ in range(8)]
    images = torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, device=device)
    total = 100_000

    def run_step(i: int) -> None:
        context, targets = masks[i % len(masks)]
        optimization.apply(optimizer, i, total)
        forward_backward(model, normalize(images), context, targets, hardware.autocast(), scaler)
        optimizer_update(model, optimizer, scaler, None, optimization.momentum_at(i, total))

    run_step(0)  # creates the optimizer state: part of the resting memory from here on
    sync(device)
    resting = peak = None
    if device.type == "cuda":
        resting = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(lambda i: run_step(i + 1), warmup, steps, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    return {"step_s": statistics.median(times), "peak_gib": peak, "resting_gib": resting,
            "arch": kwargs["arch"], "levels": len(kwargs["levels"])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="hjepa_vit_small", help="conf/model names, comma-separated")
    p.add_argument("--levels", default="config", choices=["ijepa", "config"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default=None)


def run(a: argparse.Namespace) -> list[dict]:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for name in a.models.split(","):
        off, on = (measure(name, a.levels, a.batch, a.img, a.patch, a.precision, flag, a.warmup, a.steps, device)
                   for flag in (False, True))
        cfg = f"{off['arch']} levels={a.levels}({off['levels']}) batch={a.batch} img={a.img}/{a.patch} {a.precision}"
        extra = dict(model=name, arch=off["arch"], batch=a.batch, img=a.img, patch=a.patch, precision=a.precision,
                     warmup=a.warmup, steps=a.steps)
        speed_off, speed_on = a.batch / off["step_s"], a.batch / on["step_s"]
        new = [row("train step", f"{cfg} grad_checkpointing=off", speed_off, "img/s", grad_checkpointing=False, **extra),
               row("train step", f"{cfg} grad_checkpointing=on", speed_on, "img/s", baseline=speed_off,
                   baseline_of="same config, grad_checkpointing=off", grad_checkpointing=True, **extra)]
        if device.type == "cuda":
            new += [row("peak memory", f"{cfg} grad_checkpointing=off", off["peak_gib"], "GiB",
                        resting_gib=off["resting_gib"], grad_checkpointing=False, **extra),
                    # ratio = memory without / memory with: how many times less it needs
                    row("peak memory", f"{cfg} grad_checkpointing=on", on["peak_gib"], "GiB", baseline=off["peak_gib"],
                        baseline_of="same config, grad_checkpointing=off (ratio: times less memory)",
                        higher_is_better=False, resting_gib=on["resting_gib"], grad_checkpointing=True, **extra)]
        else:
            why = f"{NOT_MEASURED} on {device.type}: peak memory is read with torch.cuda.max_memory_allocated"
            new += [row("peak memory", f"{cfg} grad_checkpointing={s}", NOT_MEASURED, "GiB", grad_checkpointing=s == "on",
                        note=why, **extra) for s in ("off", "on")]
        emit(new, a.json, a.out)
        rows += new
    if device.type != "cuda" and not a.json:
        print(f"peak memory: {NOT_MEASURED} on {device.type} (it needs CUDA); the speed rows are measured")
    return rows
