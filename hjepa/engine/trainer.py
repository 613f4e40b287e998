"""The training loop: steps, schedules, EMA, precision, checkpoints and resume."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hjepa.data.cache import check_cached_components
from hjepa.data.mixture import Mixture, MixtureSampler
from hjepa.data.transforms import normalize
from hjepa.engine import checkpoint as ckpt
from hjepa.engine.device import Hardware
from hjepa.engine.distributed import DistInfo, all_reduce_mean, all_reduce_sum, any_rank
from hjepa.engine.optim import Optimization
from hjepa.engine.preemption import preemption_signal
from hjepa.engine.step import batch_to_device, forward_backward, optimizer_update
from hjepa.errors import CheckpointError, ConfigError, NonFiniteLossError
from hjepa.logging import Logger, mask_picture


def _worker_init(_: int) -> None:
    # Decoding and augmentation are per-item work: one thread per worker avoids
    # oversubscribing the cores that the other workers use.
    torch.set_num_threads(1)
    # SLURM signals every process of the job: the main process handles preemption.
    signal.signal(preemption_signal(), signal.SIG_IGN)


class Trainer:
    """Runs H-JEPA optimisation for `epochs` epochs of the training stream.

    One optimizer step consumes `grad_accum` micro-batches of `hardware.batch_size` per
    process. `last.pt` is rewritten atomically every `checkpoint_every` steps and at the end
    of every epoch; `epoch_NNNN.pt` snapshots are kept every `snapshot_every` epochs (0: none).
    `resume`: `auto` continues from <run dir>/checkpoints/last.pt when it exists, `never`
    starts fresh (and refuses to overwrite an existing last.pt), a path resumes from that file.
    """

    def __init__(
        self,
        epochs: int = 10,
        grad_accum: int = 1,
        clip_grad: Optional[float] = None,
        log_every: int = 10,
        checkpoint_every: int = 500,
        snapshot_every: int = 0,
        resume: str = "auto",
    ):
        if epochs <= 0 or grad_accum <= 0 or log_every <= 0 or checkpoint_every <= 0 or snapshot_every < 0:
            raise ConfigError("trainer: epochs, grad_accum, log_every, checkpoint_every must be > 0, snapshot_every >= 0")
        if clip_grad is not None and clip_grad <= 0:
            raise ConfigError(f"trainer.clip_grad: expected a positive max norm or null, got {clip_grad}")
        self.epochs, self.grad_accum, self.clip_grad = epochs, grad_accum, clip_grad
        self.log_every, self.checkpoint_every, self.snapshot_every = log_every, checkpoint_every, snapshot_every
        self.resume = resume
        self._stop = False

    def request_stop(self) -> None:
        """Ask the loop to save last.pt and return after the current step (e.g. on preemption)."""
        self._stop = True

    def stop_requested(self, step: int) -> bool:
        return self._stop

    def fit(
        self,
        model: nn.Module,
        optimization: Optimization,
        hardware: Hardware,
        dataset: Mixture,
        collator: Callable,
        run_dir: Path,
        logger: Logger,
        config: dict[str, Any],
        config_yaml: str,
        seed: int,
        dist: DistInfo = DistInfo(),
        on_epoch_end: Optional[Callable[[int, int], dict]] = None,
    ) -> dict[str, Any]:
        run_dir = Path(run_dir)
        ckpt_dir = run_dir / "checkpoints"
        device = hardware.device
        batch = hardware.batch_size
        global_batch = batch * dist.world_size * self.grad_accum
        optimization.set_global_batch(global_batch)
        per_rank = dataset.epoch_length // dist.world_size
        steps_per_epoch = per_rank // batch // self.grad_accum
        if steps_per_epoch < 1:
            raise ConfigError(
                f"an epoch has {dataset.epoch_length} images, fewer than one optimizer step needs "
                f"({global_batch} = hardware.batch_size {batch} x {dist.world_size} processes x "
                f"trainer.grad_accum {self.grad_accum}); lower the batch size or use more data"
            )
        total = self.epochs * steps_per_epoch
        optimization.set_steps_per_epoch(steps_per_epoch)  # for optim.warmup_epochs

        model.to(device)
        optimizer = optimization.build(model, fused=device.type == "cuda")
        scaler = hardware.grad_scaler()
        step, earlier_wall = 0, 0.0  # wall time of earlier segments of a resumed run
        source = self._resume_source(ckpt_dir)
        if source is not None:
            state = ckpt.load(source)
            step = self._restore(state, source, model, optimizer, scaler, global_batch, dataset.epoch_length)
            earlier_wall = float(state.get("wall_time_s", 0.0))
        elif dist.is_main:
            print(f"starting a new run in {run_dir}", flush=True)  # the logger starts later
        if source is not None and dist.is_main:
            print(f"resumed from {source} at step {step}/{total}", flush=True)
        first_step = step

        step_model = model
        if dist.enabled:
            step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if hardware.compile:
            step_model = torch.compile(step_model)

        check_cached_components(dataset.datasets)
        sampler = MixtureSampler(dataset, seed=seed, rank=dist.rank, world_size=dist.world_size)
        loader = DataLoader(
            dataset, batch_size=batch, sampler=sampler, collate_fn=collator, drop_last=True,
            worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed),
            **hardware.loader_kwargs(),
        )
        logger.start(run_dir, config, total, step, enabled=dist.is_main)

        meter = _Meter(device, len(dataset.names))
        last_good = source
        last_metrics: dict[str, Any] = {}
        grid = getattr(model, "grid_size", None)
        t_start = time.perf_counter()
        t_log, step_log = t_start, step
        model.train()
        optimizer.zero_grad(set_to_none=True)
        start_epoch = step // steps_per_epoch

        def save(name: str) -> Path:
            path = ckpt_dir / name
            if dist.is_main:
                state = self._state(model, optimizer, scaler, step, steps_per_epoch, batch, config_yaml,
                                    global_batch, dataset.epoch_length)
                state["wall_time_s"] = earlier_wall + time.perf_counter() - t_start
                ckpt.save_atomic(state, path)
            return path

        for epoch in range(start_epoch, self.epochs):
            first = step - epoch * steps_per_epoch
            sampler.set_epoch(epoch)
            sampler.set_position(first * self.grad_accum * batch)
            batches = iter(loader)
            for _ in range(first, steps_per_epoch):
                for micro in range(self.grad_accum):
                    data = next(batches)
                    # uint8 images on the device (made there for datasets with cache: memory|device)
                    images, context, targets = batch_to_device(data, dataset.datasets, device)
                    if step == 0 and micro == 0 and grid is not None and dist.is_main:
                        logger.image("masks", mask_picture(images, data["context"], data["targets"], grid))
                    sync = micro == self.grad_accum - 1 or not dist.enabled
                    with contextlib.nullcontext() if sync else step_model.no_sync():
                        out = forward_backward(step_model, normalize(images), context, targets,
                                               hardware.autocast(), scaler, self.grad_accum)
                    meter.add(out, data["sources"])
                lr, wd = optimization.apply(optimizer, step, total)
                momentum = optimization.momentum_at(step, total)
                optimizer_update(model, optimizer, scaler, self.clip_grad, momentum)
                step += 1

                final = step == total
                if step % self.log_every == 0 or final:
                    now = time.perf_counter()
                    metrics = meter.flush(dist, step, last_good)
                    metrics.update(epoch=epoch + (step - epoch * steps_per_epoch) / steps_per_epoch, lr=lr,
                                   weight_decay=wd, momentum=momentum,
                                   img_per_s=(step - step_log) * global_batch / max(now - t_log, 1e-9))
                    metrics.update({f"draws/{n}": v for n, v in zip(dataset.names, metrics.pop("draws"))})
                    skipped = getattr(dataset, "num_skipped", 0)
                    if skipped:
                        metrics["data/skipped_images"] = skipped
                    logger.log(metrics, step)
                    logger.progress(step, loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{metrics['img_per_s']:.0f}")
                    t_log, step_log = now, step
                    last_metrics = metrics
                if step % self.checkpoint_every == 0 and not final:
                    meter.check_finite(dist, step, last_good)
                    last_good = save("last.pt")
                if self._should_stop(step, dist, device) and not final:
                    meter.check_finite(dist, step, last_good)
                    last_good = save("last.pt")
                    logger.write(f"stop requested: saved {last_good} at step {step}")
                    logger.close()
                    return {"status": "interrupted", "step": step, "checkpoint": str(last_good)}
            meter.check_finite(dist, step, last_good)
            last_good = save("last.pt")
            if self.snapshot_every and (epoch + 1) % self.snapshot_every == 0 and dist.is_main:
                snapshot = ckpt_dir / f"epoch_{epoch + 1:04d}.pt"
                tmp = snapshot.with_name(f".{snapshot.name}.tmp")
                shutil.copyfile(last_good, tmp)
                tmp.replace(snapshot)
            if on_epoch_end is not None:
                extra = on_epoch_end(epoch + 1, step)
                if extra:
                    logger.log(extra, step)

        wall = earlier_wall + time.perf_counter() - t_start
        logger.close()
        result = {
            "status": "completed",
            "steps": step,
            "epochs": self.epochs,
            "global_batch": global_batch,
            "checkpoint": str(ckpt_dir / "last.pt"),
            "wall_time_s": wall,
        }
        if source is not None:
            result["resumed_from_step"] = first_step
        if last_metrics:
            result["final_loss"] = last_metrics["loss"]
            result["img_per_s"] = last_metrics["img_per_s"]
        return result

    def _should_stop(self, step: int, dist: DistInfo, device: torch.device) -> bool:
        # A signal reaches the ranks at different moments, but all must save and return at
        # the same step: they agree at the logging steps, which wait for the device anyway.
        if not dist.enabled:
            return self.stop_requested(step)
        return step % self.log_every == 0 and any_rank(self.stop_requested(step), dist, device)

    def _resume_source(self, ckpt_dir: Path) -> Optional[Path]:
        last = ckpt_dir / "last.pt"
        if self.resume == "auto":
            return last if last.exists() else None
        if self.resume == "never":
            if last.exists():
                raise CheckpointError(
                    f"{last} exists and trainer.resume=never: choose a new run directory "
                    "(hydra.run.dir=...) or resume with trainer.resume=auto"
                )
            return None
        path = Path(self.resume)
        if not path.is_file():
            raise CheckpointError(f"trainer.resume={self.resume}: no such checkpoint file (or use auto / never)")
        return path

    def _restore(self, state: dict, source: Path, model: nn.Module, optimizer, scaler,
                 global_batch: int, epoch_length: int) -> int:
        ckpt.check_compatible(state["model"], model, str(source))
        if state["global_batch"] != global_batch or state["epoch_length"] != epoch_length:
            raise CheckpointError(
                f"checkpoint {source} was trained with global batch {state['global_batch']} and "
                f"{state['epoch_length']} images per epoch; this run has {global_batch} and {epoch_length}. "
                "Resume with the same data, hardware.batch_size, processes and trainer.grad_accum"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        return int(state["step"])

    def _state(self, model, optimizer, scaler, step, steps_per_epoch, sampler_batch, config_yaml,
               global_batch, epoch_length) -> dict:
        return {
            "format": ckpt.FORMAT,
            "step": step,
            "epoch": step // steps_per_epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            # Where the data stream stands (the resume itself recomputes it from the step).
            "sampler": {"epoch": step // steps_per_epoch,
                        "position": step % steps_per_epoch * self.grad_accum * sampler_batch},
            "rng": ckpt.rng_state(),
            "config": config_yaml,
            "global_batch": global_batch,
            "epoch_length": epoch_length,
        }


class _Meter:
    """Sums losses and per-component draws on the device; reads them back only when
    logging or checkpointing, so training steps never wait for the host."""

    def __init__(self, device: torch.device, num_sources: int):
        self.device, self.num_sources = device, num_sources
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.draws = torch.zeros(num_sources, dtype=torch.long)  # counted on the CPU: sources are CPU tensors
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.checked_step = 0

    def add(self, out: dict[str, torch.Tensor], sources: torch.Tensor) -> None:
        for key, value in out.items():
            v = value.detach().float()
            self.sums[key] = self.sums[key] + v if key in self.sums else v
            self.bad |= ~torch.isfinite(v)
        self.count += 1
        # bincount on a CUDA tensor reads its max back to size the output: a sync per step.
        self.draws += torch.bincount(sources.cpu(), minlength=self.num_sources)

    def check_finite(self, dist: DistInfo, step: int, last_good: Optional[Path]) -> None:
        bad = all_reduce_sum(self.bad.to(torch.int32), dist).item() > 0
        if bad:
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"the loss became NaN or infinite between step {self.checked_step} and step {step}; "
                f"training stopped and {where}. Try a lower optim.lr, trainer.clip_grad=1.0, or "
                "hardware.precision=bf16/fp32."
            )
        self.checked_step = step

    def flush(self, dist: DistInfo, step: int, last_good: Optional[Path]) -> dict[str, Any]:
        self.check_finite(dist, step, last_good)
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        means = all_reduce_mean(means, dist).tolist()
        draws = all_reduce_sum(self.draws.to(self.device), dist).tolist()
        self.sums, self.count = {}, 0
        self.draws = torch.zeros_like(self.draws)
        return {**dict(zip(keys, means)), "draws": draws}

