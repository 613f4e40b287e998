"""Time the facebookresearch/ijepa training step, as ../shared/PEER_BENCHMARKS.md describes it,
on this machine: the baseline of the step rows, measured in the same call on the same card.

    python experiments/gpu/ijepa_step.py --ijepa .gpu/ijepa                   # ViT-S/16, ViT-B/16, batch 128, 224 px, bf16
    python experiments/gpu/ijepa_step.py --ijepa .gpu/ijepa --tiny            # CPU check: vit_tiny, 32 px, batch 4, fp32

The reference code is NOT part of this project: `--ijepa` is a checkout of
github.com/facebookresearch/ijepa (commit 52c1ae9) in a git-ignored folder (see
experiments/gpu/prepare.py). This harness imports its model builder, optimizer and schedules
(src.helper.init_model / init_opt), its mask collator (src.masks.multiblock.MaskCollator),
apply_masks, repeat_interleave_batch, AllReduce and grad_logger, and runs the body of its
`train_step` (src/train.py, a closure there, so repeated here statement by statement): lr
and wd schedulers, target forward under no_grad + layer_norm + apply_masks +
repeat_interleave_batch, context encoder + predictor, smooth-L1 loss, under
`torch.cuda.amp.autocast(bfloat16)`; GradScaler backward and step; grad_logger; zero_grad;
the per-parameter EMA loop; `float(loss)`. Setup as PEER_BENCHMARKS.md: random uint8-range
images already on the GPU, I-JEPA masks (1 context block 0.85-1.0, 4 targets 0.15-0.2,
aspect 0.75-1.5, min_keep 10) from its own collator (a pool of 16 batches made beforehand;
the collator's CPU time per batch is reported apart), predictor depth 6 and width 384, 8
warm-up steps then the median of 25 steps timed with CUDA events. One process, without the
DistributedDataParallel wrappers (no process group). FLOPs counted as in hjepa.bench.step
("matmul": linear layers and the patch embedding, forward + backward; its explicit-softmax
attention products are reported apart).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from hjepa.bench.common import emit, row, time_steps  # noqa: E402

LINEAR_OPS = {"mm", "addmm", "convolution", "convolution_backward", "_convolution"}
ATTENTION_OPS = {"bmm", "baddbmm"}
MODELS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224", "vit_tiny": "vit_tiny"}


def import_reference(path: Path):
    """The reference's modules, imported from a checkout (its root holds src/)."""
    if not (path / "src" / "helper.py").is_file():
        raise SystemExit(f"{path} is not a checkout of facebookresearch/ijepa (no src/helper.py): "
                         "run experiments/gpu/prepare.py --ijepa <fetched repo> first")
    sys.path.insert(0, str(path.resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from src.helper import init_model, init_opt
        from src.masks.multiblock import MaskCollator
        from src.masks.utils import apply_masks
        from src.utils.distributed import AllReduce
        from src.utils.logging import grad_logger
        from src.utils.tensors import repeat_interleave_batch
    logging.getLogger().setLevel(logging.WARNING)  # src.helper logs the whole model at INFO
    return argparse.Namespace(init_model=init_model, init_opt=init_opt, MaskCollator=MaskCollator,
                              apply_masks=apply_masks, AllReduce=AllReduce, grad_logger=grad_logger,
                              repeat_interleave_batch=repeat_interleave_batch)


def _autocast(use_bfloat16: bool):
    """The reference's `torch.cuda.amp.autocast(dtype=torch.bfloat16, enabled=use_bfloat16)`
    (deprecated in newer torch, still the same context manager underneath)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(torch.cuda, "amp") and hasattr(torch.cuda.amp, "autocast"):
            return torch.cuda.amp.autocast(dtype=torch.bfloat16, enabled=use_bfloat16)
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bfloat16)


def bench(ref, model_name: str, batch: int, img: int, patch: int, use_bfloat16: bool, pred_depth: int,
          pred_dim: int, min_keep: int, warmup: int, steps: int, device: torch.device, mask_pool: int = 16,
          flop_steps: int = 4) -> dict:
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as src/train.py sets it
    encoder, predictor = ref.init_model(device=device, patch_size=patch, crop_size=img, pred_depth=pred_depth,
                                        pred_emb_dim=pred_dim, model_name=model_name)
    target_encoder = copy.deepcopy(encoder)
    ipe, epochs = 1000, 300  # schedule lengths: values only, the cost per step is the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler's deprecation notice
        optimizer, scaler, scheduler, wd_scheduler = ref.init_opt(
            encoder=encoder, predictor=predictor, wd=0.04, final_wd=0.4, start_lr=0.0002, ref_lr=0.001,
            final_lr=1e-6, iterations_per_epoch=ipe, warmup=40, num_epochs=epochs, ipe_scale=1.0,
            use_bfloat16=use_bfloat16)
    for p in target_encoder.parameters():
        p.requires_grad = False
    ema = (0.996, 1.0)
    momentum_scheduler = (ema[0] + i * (ema[1] - ema[0]) / (ipe * epochs) for i in range(int(ipe * epochs) + 1))

    collator = ref.MaskCollator(input_size=img, patch_size=patch, pred_mask_scale=(0.15, 0.2),
                                enc_mask_scale=(0.85, 1.0), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                allow_overlap=False, min_keep=min_keep)
    t = time.process_time()
    pool = [collator([0] * batch)[1:] for _ in range(mask_pool)]
    collator_ms = (time.process_time() - t) / mask_pool * 1e3
    pool = [([m.to(device) for m in enc], [m.to(device) for m in pred]) for enc, pred in pool]
    imgs = torch.randn(batch, 3, img, img, device=device)

    def train_step(i: int):
        masks_enc, masks_pred = pool[i % len(pool)]
        _new_lr = scheduler.step()
        _new_wd = wd_scheduler.step()

        def forward_target():
            with torch.no_grad():
                h = target_encoder(imgs)
                h = F.layer_norm(h, (h.size(-1),))  # normalize over feature-dim
                B = len(h)
                h = ref.apply_masks(h, masks_pred)
                h = ref.repeat_interleave_batch(h, B, repeat=len(masks_enc))
                return h

        def forward_context():
            z = encoder(imgs, masks_enc)
            z = predictor(z, masks_enc, masks_pred)
            return z

        def loss_fn(z, h):
            loss = F.smooth_l1_loss(z, h)
            loss = ref.AllReduce.apply(loss)
            return loss

        with _autocast(use_bfloat16):
            h = forward_target()
            z = forward_context()
            loss = loss_fn(z, h)
        if use_bfloat16:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        grad_stats = ref.grad_logger(encoder.named_parameters())
        optimizer.zero_grad()
        with torch.no_grad():
            m = next(momentum_scheduler)
            for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):
                param_k.data.mul_(m).add_((1. - m) * param_q.detach().data)
        return (float(loss), _new_lr, _new_wd, grad_stats)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(train_step, warmup, steps, device)
    median = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    flops = count_flops(lambda i: forward_backward_only(ref, encoder, predictor, target_encoder, imgs, pool[i],
                                                        use_bfloat16, optimizer), min(flop_steps, len(pool)))
    img_s = batch / median
    ctx = statistics.mean(enc[0].shape[1] for enc, _ in pool)
    tgt = statistics.mean(pred[0].shape[1] for _, pred in pool)
    cfg = (f"facebookresearch/ijepa {model_name} pred {pred_depth}x{pred_dim} batch={batch} img={img}/{patch} "
           f"{'bf16' if use_bfloat16 else 'fp32'}")
    return row("train step (facebookresearch/ijepa)", cfg, img_s, "img/s", model=model_name,
               arch=MODELS.get(model_name, model_name), batch=batch, img=img, patch=patch,
               precision="bf16" if use_bfloat16 else "fp32", step_ms=median * 1e3,
               step_ms_spread=[min(times) * 1e3, max(times) * 1e3],
               gflop_per_img_matmul=flops["matmul"] / batch / 1e9,
               gflop_per_img_attention=flops["attention"] / batch / 1e9,
               tflops_matmul=flops["matmul"] / median / 1e12, peak_memory_gib=peak_mem,
               mean_context_tokens=ctx, mean_target_tokens=tgt, mask_collator_ms_per_batch=collator_ms,
               warmup=warmup, steps=steps, reference_commit="52c1ae9")


def forward_backward_only(ref, encoder, predictor, target_encoder, imgs, masks, use_bfloat16, optimizer):
    """The reference step's forward and backward (what the FLOP count covers)."""
    masks_enc, masks_pred = masks
    with _autocast(use_bfloat16):
        with torch.no_grad():
            h = target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = ref.repeat_interleave_batch(ref.apply_masks(h, masks_pred), len(h), repeat=len(masks_enc))
        z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
    loss.backward()
    optimizer.zero_grad()


def count_flops(run, n: int) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for i in range(n):
        counter = FlopCounterMode(display=False)
        with counter:
            run(i)
        for op, count in counter.get_flop_counts().get("Global", {}).items():
            name = str(op).split(".")[1] if "." in str(op) else str(op)
            key = "matmul" if name in LINEAR_OPS else "attention" if name in ATTENTION_OPS or "attention" in name else "other"
            totals[key] += count
    return {k: v / n for k, v in totals.items()}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ijepa", type=Path, default=ROOT / ".gpu" / "ijepa", help="checkout of facebookresearch/ijepa")
    p.add_argument("--models", default="vit_small,vit_base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--pred-depth", type=int, default=6)
    p.add_argument("--pred-dim", type=int, default=384)
    p.add_argument("--min-keep", type=int, default=10)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--mask-pool", type=int, default=16, help="mask batches made beforehand and cycled through")
    p.add_argument("--flop-steps", type=int, default=4, help="steps the FLOPs are counted on")
    p.add_argument("--tiny", action="store_true", help="CPU check: vit_tiny, 32 px / 4, batch 2, predictor 1x48, fp32")
    p.add_argument("--out", default=None, help="append the JSON rows to this file")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")  # float(loss)
    if a.tiny:
        a.models, a.img, a.patch, a.batch, a.precision = "vit_tiny", 32, 4, 2, "fp32"
        a.pred_depth, a.pred_dim, a.min_keep, a.warmup, a.steps, a.mask_pool, a.flop_steps = 1, 48, 4, 1, 1, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.precision == "bf16" and device.type != "cuda":
        raise SystemExit("--precision bf16 is the reference's CUDA setting (torch.cuda.amp.autocast); use fp32 on the CPU")
    ref = import_reference(a.ijepa)
    for name in a.models.split(","):
        try:
            r = bench(ref, name, a.batch, a.img, a.patch, a.precision == "bf16", a.pred_depth, a.pred_dim, a.min_keep,
                      a.warmup, a.steps, device, a.mask_pool, a.flop_steps)
        except Exception as e:  # one failing model must not lose the other
            r = row("train step (facebookresearch/ijepa)", f"facebookresearch/ijepa {name}", float("nan"), "img/s",
                    model=name, arch=MODELS.get(name, name), error=f"{type(e).__name__}: {str(e)[:500]}")
        emit([r], True, a.out)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
