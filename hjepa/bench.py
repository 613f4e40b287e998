"""`python -m hjepa.bench {step,data,masks,matmul,e2e}`: throughput of the training step, the
data pipeline and the mask collator, each next to its baseline measured the same way.

    python -m hjepa.bench step                      # ViT-S/16 and ViT-B/16, I-JEPA and model levels, eager and compiled
    python -m hjepa.bench step --models hjepa_vit_small --levels ijepa --compile off --json
    python -m hjepa.bench step --arch test_vit --img 32 --patch 4 --batch 8 --precision fp32 --steps 3   # CPU logic check
    python -m hjepa.bench data --images ../shared/data/imagenet-samples --n 200
    python -m hjepa.bench masks
    python -m hjepa.bench e2e --images pack.tar --copies 10 --workers 15      # real Trainer on JPEG folders

Every command prints a table; ``--json`` prints one JSON object per row instead (keys: what,
config, value, unit, baseline, baseline_of, ratio, device, torch, and row-specific extras),
and ``--out FILE`` appends the same JSON lines to FILE. Nothing here needs Hydra: the model
is built from conf/model/<name>.yaml with a plain constructor call (the same arguments the
Hydra config passes), so the GPU machine, which has torch and timm only, runs it as is.

`step` times exactly the Trainer's step (hjepa.engine.step: normalise, target forward +
context encoder + predictor + loss under autocast, backward, fused AdamW, foreach EMA) on
uint8 images already on the device, with fresh I-JEPA masks from the project's collator,
warm-up then the median of timed steps (CUDA events on a GPU). FLOPs are counted with
torch.utils.flop_counter on the same steps: "matmul" FLOPs are those of the linear layers
and the patch embedding (forward + backward; the definition of ../shared/PEER_BENCHMARKS.md),
attention score FLOPs are reported apart. The card's bf16 matmul rate is measured in the
same process (8192^3 product).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# facebookresearch/ijepa on one H100 80GB HBM3, batch 128, 224 px, bf16, I-JEPA masking,
# images on the GPU (../shared/PEER_BENCHMARKS.md, measured 2026-11-27): img/s.
REFERENCE_STEP = {"vit_small_patch16_224": 1844.0, "vit_base_patch16_224": 1219.0}
IJEPA_LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}]
MATMUL_OPS = {"mm", "addmm", "bmm", "convolution", "convolution_backward", "_convolution"}


# ----------------------------------------------------------------------------- rows / output

def env() -> dict[str, str]:
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name()})"
    return {"device": dev, "torch": torch.__version__}


def row(what: str, config: str, value: float, unit: str, baseline: Optional[float] = None,
        baseline_of: Optional[str] = None, higher_is_better: bool = True, **extra: Any) -> dict:
    ratio = None
    if baseline:
        ratio = value / baseline if higher_is_better else baseline / value
    return {"what": what, "config": config, "value": value, "unit": unit, "baseline": baseline,
            "baseline_of": baseline_of, "ratio": ratio, **env(), **extra}


def emit(rows: list[dict], as_json: bool, out: Optional[str]) -> None:
    """As each row is measured: append it to `out`, and print it when `as_json` (the table
    comes at the end, from main)."""
    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)


def print_table(rows: list[dict]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    head = ["what", "config", "value", "unit", "baseline", "ratio"]
    table = [[fmt(r.get(k)) for k in head] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    extras = [r for r in rows if "tflops_matmul" in r]
    for r in extras:
        frac = r.get("fraction_of_matmul_peak")
        print(f"  {r['config']}: {r['step_ms']:.2f} ms/step, {r['gflop_per_img_matmul']:.2f} GFLOP/img matmul "
              f"(+{r['gflop_per_img_attention']:.2f} attention), {r['tflops_matmul']:.2f} TFLOP/s"
              + (f" = {frac:.1%} of the measured matmul peak" if frac is not None else "")
              + (f", peak memory {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else "")
              + (f", host syncs/step {r['host_syncs_per_step']:g}" if r.get("host_syncs_per_step") is not None else ""))
    for r in rows:
        if r.get("error") or r.get("skipped"):
            print(f"  {r['config']}: {r.get('error') or r.get('skipped')}")
    print(f"device: {env()['device']}, torch {torch.__version__}", flush=True)


# ----------------------------------------------------------------------------- configs without Hydra

def load_yaml_node(group: str, name: str, values: dict[str, Any]) -> dict:
    """conf/<group>/<name>.yaml with its `defaults` merged (base first, then the node) and
    ${key} interpolations taken from `values`: what Hydra composes for that group."""
    import yaml

    node = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    merged: dict = {}
    for entry in node.pop("defaults", []):
        if entry != "_self_":
            merged.update(load_yaml_node(group, entry, values))
    merged.update(node)

    def resolve(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("${") and v.endswith("}"):
            return values[v[2:-1]]
        if isinstance(v, list):
            return [resolve(x) for x in v]
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        return v

    return {k: resolve(v) for k, v in merged.items()}


def model_kwargs(name: str, img: int, patch: int, levels: str, arch: Optional[str] = None,
                 predictor: Optional[tuple[int, int, int]] = None) -> dict:
    """HJEPA constructor arguments of conf/model/<name>.yaml; levels "ijepa" replaces the
    levels by I-JEPA's single one (= conf/model/ijepa_vit_small.yaml), "config" keeps them."""
    node = load_yaml_node("model", name, {"image_size": img, "patch_size": patch})
    if node.pop("_target_") != "hjepa.models.hjepa.HJEPA":
        raise SystemExit(f"conf/model/{name}.yaml does not build hjepa.models.hjepa.HJEPA")
    if levels == "ijepa":
        node["levels"] = IJEPA_LEVELS
    if arch:
        node["arch"] = arch
    if predictor:
        node["predictor_dim"], node["predictor_depth"], node["predictor_heads"] = predictor
    return node


def mask_kwargs() -> dict:
    node = load_yaml_node("mask", "multiblock", {})
    node.pop("_target_")
    return node


def optim_kwargs() -> dict:
    node = load_yaml_node("optim", "adamw", {})
    node.pop("_target_")
    return node


# ----------------------------------------------------------------------------- timing helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[int], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per call of fn(i), each timed alone (CUDA events on a GPU), after warm-up."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            fn(warmup + i)
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for i in range(steps):
            t = time.perf_counter()
            fn(warmup + i)
            times.append(time.perf_counter() - t)
    return times


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


# ----------------------------------------------------------------------------- step

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


def bench_step(model_name: str, levels: str, batch: int, img: int, patch: int, precision: str, compile_: bool,
               warmup: int, steps: int, device: torch.device, arch: Optional[str] = None,
               predictor: Optional[tuple[int, int, int]] = None, channels_last: bool = False,
               peak: Optional[dict] = None, mask_pool: int = 16) -> dict:
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
    )
    if peak:
        extra.update(matmul_peak_tflops=peak["tflops"], fraction_of_matmul_peak=matmul_tflops / peak["tflops"])
    return row("train step", cfg, img_s, "img/s", **extra)


def cmd_step(a: argparse.Namespace) -> list[dict]:
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
                                   device, a.arch, predictor, a.channels_last, peak)
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


# ----------------------------------------------------------------------------- masks

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


def cmd_masks(a: argparse.Namespace) -> list[dict]:
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


# ----------------------------------------------------------------------------- data

def unpack_images(source: str, workdir: Path, n: Optional[int] = None) -> Path:
    """A flat folder of images: `source` itself, or a .tar of images unpacked into workdir."""
    src = Path(source).expanduser()
    if src.is_dir():
        return src
    out = workdir / "images"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members[:n] if n else members:
            (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return out


def class_tree(flat: Path, workdir: Path, n: Optional[int], copies: int = 1) -> Path:
    """<workdir>/tree/<class>/<file> symlinks to the first n images of a flat folder (class =
    name up to the first "_"), each `copies` times under distinct names."""
    from hjepa.data.folder import list_images

    tree = workdir / f"tree{copies}"
    files = list_images(flat)[:n] if n else list_images(flat)
    for f in files:
        name = Path(f).name
        cls = tree / name.split("_", 1)[0]
        cls.mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            link = cls / (name if c == 0 else f"c{c}_{name}")
            if not link.exists():
                link.symlink_to(Path(f).resolve())
    return tree


def baseline_dataset(tree: Path, size: int):
    """torchvision ImageFolder + PIL + RandomResizedCrop(0.3, 1) + ToTensor + Normalize: ijepa's pipeline."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder as TVImageFolder

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.3, 1.0)), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return TVImageFolder(str(tree), transform=tf)


def our_transform(size: int):
    from hjepa.data.transforms import train_transform

    return train_transform(size, [0.3, 1.0], [3 / 4, 4 / 3], 0.0, 0.0)  # conf/transform/ijepa.yaml


class _FullDecode:
    """Ours without the fused crop-while-decoding (full torchvision decode, then the v2 transform)."""

    def __init__(self, dataset):
        self.dataset, self.transform = dataset, dataset.transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from hjepa.data.io import decode_image

        path, label = self.dataset.samples[i]
        return self.transform(decode_image(path)), label


def per_image_ms(dataset, rounds: int = 3) -> tuple[float, list[float]]:
    """CPU (process) ms per item over the whole dataset, one thread, median of `rounds` passes;
    every pass is seeded alike, so all pipelines draw the same crop boxes."""
    times = []
    for _ in range(rounds):
        torch.manual_seed(0)
        t = time.process_time()
        for i in range(len(dataset)):
            dataset[i]
        times.append((time.process_time() - t) / len(dataset) * 1e3)
    return statistics.median(times), times


def loader_rate(dataset, workers: int, batch: int = 128, batches: int = 30, warmup: int = 5) -> float:
    """img/s of a DataLoader (persistent workers, prefetch 4, pinned memory on CUDA, one torch
    thread per worker) over `batches` batches after `warmup`."""
    from torch.utils.data import DataLoader, RandomSampler

    from hjepa.engine.trainer import _worker_init

    sampler = RandomSampler(dataset, replacement=True, num_samples=(batches + warmup) * batch,
                            generator=torch.Generator().manual_seed(0))
    kw = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init)
    if workers:
        kw.update(persistent_workers=True, prefetch_factor=4)
    it = iter(DataLoader(dataset, batch_size=batch, sampler=sampler, **kw))
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def cmd_data(a: argparse.Namespace) -> list[dict]:
    from hjepa.data.folder import ImageFolder
    from hjepa.data.prepare import prepare
    from hjepa.data.shards import PreparedDataset

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flat = unpack_images(a.images, work, a.n)
        tree = class_tree(flat, work, a.n)
        prepared = a.prepared
        if prepared is None:
            prepared = str(work / "prepared")
            t = time.perf_counter()
            index = prepare(str(tree), prepared, workers=a.prepare_workers or 0)
            print(f"prepared {index['splits']['train']['count']} images in {time.perf_counter() - t:.1f} s "
                  f"(verified: {index['splits']['train'].get('verified')})", file=sys.stderr)
        tf = our_transform(a.size)
        pipelines = {
            "baseline": baseline_dataset(tree, a.size),
            "ours": ImageFolder(str(tree), "train", transform=tf),
            "ours_full_decode": None,
            "prepared": PreparedDataset(prepared, "train", transform=tf),
        }
        pipelines["ours_full_decode"] = _FullDecode(pipelines["ours"])
        n = len(pipelines["ours"])
        res: dict[str, list[float]] = {k: [] for k in pipelines}
        for _ in range(a.rounds):  # interleaved: drift on a shared machine hits every pipeline alike
            for k, ds in pipelines.items():
                res[k].append(per_image_ms(ds, rounds=1)[0])
        ms = {k: statistics.median(v) for k, v in res.items()}
        cfg = f"{n} ImageNet JPEGs -> {a.size} px RandomResizedCrop(0.3-1), 1 core, CPU ms/img (process time)"
        base = 1e3 / ms["baseline"]
        names = {
            "baseline": "data: ImageFolder+PIL+RRC+ToTensor+Normalize (ijepa)",
            "ours_full_decode": "data: torchvision.io decode + v2 RRC on uint8",
            "ours": "data: ours (crop drawn first, DCT-reduced JPEG decode where allowed)",
            "prepared": "data: ours from the prepared format (short side 256)",
        }
        for k in ("baseline", "ours_full_decode", "ours", "prepared"):
            rows.append(row(names[k], cfg, 1e3 / ms[k], "img/s/core", None if k == "baseline" else base,
                            None if k == "baseline" else "baseline, same run", ms_per_img=ms[k], rounds=res[k]))
            emit(rows[-1:], a.json, a.out)
        for w in [int(x) for x in a.workers.split(",") if x] if a.workers else []:
            for k in ("baseline", "ours", "prepared"):
                rate = loader_rate(pipelines[k], w, a.batch)
                rows.append(row(f"loader: {k}", f"DataLoader {w} workers, batch {a.batch}, {a.size} px", rate, "img/s"))
                emit(rows[-1:], a.json, a.out)
    return rows


# ----------------------------------------------------------------------------- end to end

def cmd_e2e(a: argparse.Namespace) -> list[dict]:
    """The real Trainer on a folder of JPEGs (or the prepared copy, or a decoded cache), next
    to the step-only rate of the same model measured in the same process."""
    from hjepa.data.folder import ImageFolder
    from hjepa.data.mixture import Mixture
    from hjepa.data.prepare import prepare
    from hjepa.data.shards import PreparedDataset
    from hjepa.data.transforms import train_transform
    from hjepa.engine.device import Hardware
    from hjepa.engine.optim import Optimization
    from hjepa.engine.trainer import Trainer
    from hjepa.logging import Logger
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
        trainer.fit(model=model, optimization=Optimization(**optim_kwargs()), hardware=hardware, dataset=data,
                    collator=MultiBlockMaskCollator(model.grid_size, **mask_kwargs()), run_dir=run_dir,
                    logger=Logger(progress=False), config={}, config_yaml="", seed=0)
        wall = time.perf_counter() - t
        records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
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


# ----------------------------------------------------------------------------- pack

def cmd_pack(a: argparse.Namespace) -> list[dict]:
    """A .tar of the first n images of a flat folder, for machines that do not see ../shared."""
    from hjepa.data.folder import list_images

    files = list_images(Path(a.images).expanduser())[: a.n]
    Path(a.pack).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(a.pack, "w") as tar:
        for f in files:
            tar.add(f, arcname=Path(f).name)
    print(f"packed {len(files)} images into {a.pack} ({Path(a.pack).stat().st_size / 1e6:.1f} MB)")
    return []


# ----------------------------------------------------------------------------- CLI

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hjepa.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--json", action="store_true", help="one JSON object per row")
        q.add_argument("--out", default=None, help="also append the JSON rows to this file")

    s = sub.add_parser("step", help="training step throughput")
    common(s)
    s.add_argument("--models", default="hjepa_vit_small,hjepa_vit_base", help="conf/model names, comma-separated")
    s.add_argument("--levels", default="both", choices=["ijepa", "config", "both"])
    s.add_argument("--compile", default="both", choices=["off", "on", "both"])
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--img", type=int, default=224)
    s.add_argument("--patch", type=int, default=16)
    s.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    s.add_argument("--arch", default=None, help="override the timm arch (e.g. test_vit for CPU checks)")
    s.add_argument("--predictor", default=None, help="dim,depth,heads override")
    s.add_argument("--warmup", type=int, default=8)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--channels-last", action="store_true")
    s.add_argument("--device", default=None)
    s.add_argument("--budget-s", type=float, default=0, help="skip compiled rows once this many seconds are spent")

    m = sub.add_parser("masks", help="mask collator time per batch")
    common(m)
    m.add_argument("--batch", type=int, default=128)
    m.add_argument("--grid", type=int, default=14)
    m.add_argument("--repeats", type=int, default=100)

    d = sub.add_parser("data", help="decode + crop per CPU core, and DataLoader rates")
    common(d)
    d.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"),
                   help="a flat folder of JPEGs or a .tar of them (python -m hjepa.bench pack)")
    d.add_argument("--n", type=int, default=200, help="images used")
    d.add_argument("--size", type=int, default=224)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--workers", default="", help="also DataLoader img/s at these worker counts, e.g. 2 or 15")
    d.add_argument("--batch", type=int, default=128)
    d.add_argument("--prepared", default=None, help="an existing prepared copy of the same images")
    d.add_argument("--prepare-workers", type=int, default=0)

    e = sub.add_parser("e2e", help="the real Trainer on JPEG folders vs step only")
    common(e)
    e.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"))
    e.add_argument("--n", type=int, default=400)
    e.add_argument("--copies", type=int, default=10, help="symlinks per image (a few thousand files)")
    e.add_argument("--format", default="jpeg", choices=["jpeg", "prepared"])
    e.add_argument("--cache", default="none", choices=["none", "memory", "device"])
    e.add_argument("--model", default="hjepa_vit_base")
    e.add_argument("--levels", default="ijepa", choices=["ijepa", "config"])
    e.add_argument("--arch", default=None)
    e.add_argument("--batch", type=int, default=128)
    e.add_argument("--img", type=int, default=224)
    e.add_argument("--patch", type=int, default=16)
    e.add_argument("--precision", default="bf16")
    e.add_argument("--compile", action="store_true")
    e.add_argument("--workers", type=int, default=15)
    e.add_argument("--train-steps", type=int, default=60)
    e.add_argument("--log-every", type=int, default=10)
    e.add_argument("--warmup", type=int, default=8)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--loader-only", action="store_true", help="also the DataLoader alone, to name a bottleneck")
    e.add_argument("--device", default=None)

    k = sub.add_parser("pack", help="tar the first n images of a folder (for the GPU machine)")
    k.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-samples"))
    k.add_argument("--n", type=int, default=400)
    k.add_argument("pack")

    a = p.parse_args(argv)
    if a.cmd == "data" and a.images and not Path(a.images).expanduser().exists():
        raise SystemExit(f"--images {a.images} does not exist")
    rows = {"step": cmd_step, "masks": cmd_masks, "data": cmd_data, "e2e": cmd_e2e, "pack": cmd_pack}[a.cmd](a)
    if rows and not a.json:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
