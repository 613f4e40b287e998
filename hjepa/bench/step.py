"""`step`: the Trainer's training step (hjepa.engine.step) on uint8 images already on the
device, with fresh masks from the project's collator: img/s, matmul and attention FLOPs,
TFLOP/s against the card's measured bf16 matmul rate, peak memory and host syncs per step."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Callable, Optional

import torch

from hjepa.bench.common import (MATMUL_OPS, REFERENCE_STEP, emit, mask_kwargs, model_kwargs, optim_kwargs, row, sync,
                                time_steps)

def matmul_rate(device: torch.device, size: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """TFLOP/s of a size^3 matrix product on random data (bf16 on a GPU, fp32 on a CPU)."""
    if device.type == "cuda":
        size, dtype = size or 8192, dtype or torch.bfloat16
    else:
        size, dtype = size or 512, dtype or torch.float32
    sets = [(torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype))
            for _ in range(2)]
    times = time_steps(lambda i: sets[i % 2][0] @ sets[i % 2][1], 3, 10, device)
    t = statistics.median(times)
    return {"tflops": 2 * size ** 3 / t / 1e12, "size": size, "dtype": str(dtype).replace("torch.", "")}


def count_step_flops(run_step: Callable[[int], Any], indices: list[int]) -> dict[str, float]:
    """Average FLOPs per step over steps `indices` (forward + backward): matmul vs attention."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for i in indices:
        counter = FlopCounterMode(display=False)
        with counter:
            run_step(i)
        for op, n in counter.get_flop_counts().get("Global", {}).items():
            name = str(op).split(".")[1] if "." in str(op) else str(op)
            key = "matmul" if name in MATMUL_OPS else "attention" if "attention" in name else "other"
            totals[key] += n
    return {k: v / len(indices) for k, v in totals.items()}


def profile_steps(run_step: Callable[[int], Any], indices: list[int], device: torch.device, top: int = 8) -> list[dict]:
    """The ops (kernels, on a GPU) that take the most time over steps `indices`, by self time:
    [{name, ms_per_step, share}] where share is of the total self time recorded."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in indices:
            run_step(i)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, float(getattr(e, attr, 0.0) or 0.0)) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    events.sort(key=lambda e: -e[1])
    return [{"name": name[:80], "ms_per_step": t / 1e3 / len(indices), "share": t / total} for name, t in events[:top]]


def bench_step(model_name: str, levels: str, batch: int, img: int, patch: int, precision: str, compile_: bool,
               warmup: int, steps: int, device: torch.device, arch: Optional[str] = None,
               predictor: Optional[tuple[int, int, int]] = None, channels_last: bool = False,
               peak: Optional[dict] = None, mask_pool: int = 16, profile: bool = False) -> dict:
    from hjepa.data.transforms import normalize
    from hjepa.engine.device import Hardware
    from hjepa.engine.optim import Optimization
    from hjepa.engine.step import forward_backward, optimizer_update
    from hjepa.masks import MultiBlockMaskCollator
    from hjepa.models.hjepa import HJEPA

    torch.manual_seed(0)
    kwargs = model_kwargs(model_name, img, patch, levels, arch, predictor)
    model = HJEPA(**kwargs).to(device)
    hardware = Hardware(device=device.type, precision=precision, batch_size=batch, num_workers=0, compile=compile_)
    optimization = Optimization(**optim_kwargs())
    optimizer = optimization.build(model, fused=device.type == "cuda")  # as the Trainer builds it
    scaler = hardware.grad_scaler()
    step_model = torch.compile(model) if compile_ else model  # as the Trainer compiles it
    collator = MultiBlockMaskCollator(model.grid_size, **mask_kwargs())
    g = torch.Generator().manual_seed(0)
    masks = [tuple(t.to(device) for t in collator.sample(batch, g)) for _ in range(mask_pool)]
    images = torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    total = 100_000  # schedule horizon: values only, the cost is the same at any step
    model.train()

    def fwd_bwd(i: int) -> dict:
        context, targets = masks[i % len(masks)]
        return forward_backward(step_model, normalize(images), context, targets, hardware.autocast(), scaler)

    def run_step(i: int) -> None:
        optimization.apply(optimizer, i, total)
        fwd_bwd(i)
        optimizer_update(model, optimizer, scaler, None, optimization.momentum_at(i, total))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_compile = time.perf_counter()
    run_step(0)
    sync(device)
    first_step_s = time.perf_counter() - t_compile
    times = time_steps(run_step, warmup, steps, device)
    median = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    syncs = None
    if device.type == "cuda" and not compile_:  # count host syncs the CUDA runtime sees in 3 steps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for i in range(3):
                    run_step(i)
                torch.cuda.synchronize(device)  # our own wait, outside the set mode below
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught) / 3

    top_ops = profile_steps(run_step, list(range(2)), device) if profile else None
    flops = count_step_flops(lambda i: (fwd_bwd(i), optimizer.zero_grad(set_to_none=True)),
                             list(range(min(len(masks), 8))))
    img_s = batch / median
    matmul_tflops = flops["matmul"] / median / 1e12
    ctx_len = statistics.mean(m[0].shape[1] for m in masks)
    tgt_len = statistics.mean(m[1].shape[2] for m in masks)
    n_levels = len(kwargs["levels"])
    cfg = (f"{kwargs['arch']} levels={levels}({n_levels}) batch={batch} img={img}/{patch} {precision}"
           f" compile={'on' if compile_ else 'off'}" + (" channels_last" if channels_last else ""))
    extra = dict(
        model=model_name, arch=kwargs["arch"], levels=n_levels, batch=batch, img=img, patch=patch, precision=precision,
        compile=compile_, channels_last=channels_last, step_ms=median * 1e3,
        step_ms_spread=[min(times) * 1e3, max(times) * 1e3], first_step_s=first_step_s,
        gflop_per_img_matmul=flops["matmul"] / batch / 1e9, gflop_per_img_attention=flops["attention"] / batch / 1e9,
        tflops_matmul=matmul_tflops, peak_memory_gib=peak_mem, host_syncs_per_step=syncs,
        mean_context_tokens=ctx_len, mean_target_tokens=tgt_len, warmup=warmup, steps=steps,
        profile=top_ops,
    )
    if peak:
        extra.update(matmul_peak_tflops=peak["tflops"], fraction_of_matmul_peak=matmul_tflops / peak["tflops"])
    return row("train step", cfg, img_s, "img/s", **extra)

HELP = "training step throughput"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="hjepa_vit_small,hjepa_vit_base", help="conf/model names, comma-separated")
    p.add_argument("--levels", default="both", choices=["ijepa", "config", "both"])
    p.add_argument("--compile", default="both", choices=["off", "on", "both"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--arch", default=None, help="override the timm arch (e.g. test_vit for CPU checks)")
    p.add_argument("--predictor", default=None, help="dim,depth,heads override")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--budget-s", type=float, default=0, help="skip compiled rows once this many seconds are spent")
    p.add_argument("--mask-pool", type=int, default=16, help="mask batches drawn beforehand and cycled through")
    p.add_argument("--profile", action="store_true", help="add the ops (GPU kernels) taking the most time to each row")


def run(a: argparse.Namespace) -> list[dict]:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_rate(device)
    rows = [row("matmul peak", f"{peak['size']}^3 {peak['dtype']}", peak["tflops"], "TFLOP/s")]
    emit(rows[-1:], a.json, a.out)
    predictor = tuple(int(x) for x in a.predictor.split(",")) if a.predictor else None
    compiles = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    levels = ["ijepa", "config"] if a.levels == "both" else [a.levels]
    eager: dict[tuple, float] = {}
    t0 = time.perf_counter()
    for compile_ in compiles:
        for name in a.models.split(","):
            for lv in levels:
                if compile_ and a.budget_s and time.perf_counter() - t0 > a.budget_s:
                    r = row("train step", f"{name} levels={lv} compile=on", float("nan"), "img/s",
                            skipped=f"time budget of {a.budget_s} s spent")
                    rows.append(r), emit([r], a.json, a.out)
                    continue
                try:
                    r = bench_step(name, lv, a.batch, a.img, a.patch, a.precision, compile_, a.warmup, a.steps,
                                   device, a.arch, predictor, a.channels_last, peak, a.mask_pool, a.profile)
                except Exception as e:  # one failing variant (e.g. a compiler error) must not lose the others
                    r = row("train step", f"{name} levels={lv} compile={'on' if compile_ else 'off'}", float("nan"),
                            "img/s", error=f"{type(e).__name__}: {str(e)[:500]}")
                    rows.append(r), emit([r], a.json, a.out)
                    continue
                key = (name, lv, a.channels_last)
                if not compile_:
                    eager[key] = r["value"]
                # baselines: the reference code (same setup only), the I-JEPA levels, eager
                ref = REFERENCE_STEP.get(r["arch"])
                same_setup = (device.type == "cuda" and a.batch == 128 and a.img == 224 and a.patch == 16
                              and a.precision == "bf16" and not predictor)
                if compile_ and key in eager:
                    r.update(baseline=eager[key], baseline_of="same config, eager", ratio=r["value"] / eager[key])
                elif lv == "config" and (name, "ijepa", a.channels_last) in eager:
                    base = eager[(name, "ijepa", a.channels_last)]
                    r.update(baseline=base, baseline_of="same model, I-JEPA levels (target: ratio >= 0.9)",
                             ratio=r["value"] / base)
                elif lv == "ijepa" and ref and same_setup:
                    r.update(baseline=ref, baseline_of="facebookresearch/ijepa on an H100 (PEER_BENCHMARKS.md, same setup)",
                             ratio=r["value"] / ref)
                rows.append(r)
                emit([r], a.json, a.out)
                del r
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows
