"""The training loop: steps, schedules, EMA, precision, checkpoints and resume.

One batch, from the loader to the loss: the sampler yields (key, index) pairs, the Mixture
makes an Item per pair in a loader worker, the mask collator stacks them into a Batch with
its masks, `Mixture.to_device` puts uint8 images on the device, and `forward_backward`
(hjepa.engine.step) normalises them and runs the model.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hjepa.data.batch import Batch
from hjepa.data.mixture import Mixture, MixtureSampler
from hjepa.data.transforms import normalize
from hjepa.engine import checkpoint as ckpt
from hjepa.engine.device import Hardware
from hjepa.engine.distributed import DistInfo, all_reduce_mean, all_reduce_sum, any_rank, barrier
from hjepa.engine.optim import Optimization
from hjepa.engine.preemption import preemption_signal
from hjepa.engine.step import forward_backward, optimizer_update
from hjepa.errors import CheckpointError, ConfigError, NonFiniteLossError
from hjepa.loggers import Logger
from hjepa.masks import mask_picture
from hjepa import runs
from hjepa.atomic import atomic_write, stale_temporaries
from hjepa.runs import Summary


@dataclass(frozen=True)
class RunContext:
    """The run a Trainer writes: its directory, its resolved config (sent to the loggers and,
    as YAML, stored in every checkpoint), its seed and this process's place in a DDP job."""

    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    config_yaml: str = ""
    seed: int = 0
    dist: DistInfo = DistInfo()


class Callback(Protocol):
    def on_epoch_end(self, model: nn.Module, epoch: int, logger: Logger) -> dict[str, float]:
        """Called on rank 0 after epoch `epoch` (1-based) is saved; returns metrics to log."""


@dataclass(frozen=True)
class _Plan:
    batch: int             # per process and micro-batch
    global_batch: int      # per optimizer step, over all processes
    steps_per_epoch: int
    total: int
    epoch_length: int


@dataclass
class _Progress:
    step: int
    last_good: Optional[Path]     # the checkpoint a resume would start from
    earlier_wall: float = 0.0     # wall time of earlier segments of a resumed run
    started: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    step_log: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return self.earlier_wall + time.perf_counter() - self.started


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Files a killed writer left half-written (atomic_write's temporaries), e.g. a checkpoint."""
    stale = [p for d in (run_dir, run_dir / runs.CHECKPOINTS) if d.is_dir() for p in stale_temporaries(d)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temporary file{'s' if len(stale) > 1 else ''} left by an interrupted write: "
              + ", ".join(p.name for p in stale[:3]), flush=True)


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

    # ------------------------------------------------------------------ the loop

    def fit(self, model: nn.Module, optimization: Optimization, hardware: Hardware, data: Mixture,
            collator: Callable, logger: Logger, run: RunContext, callbacks: tuple[Callback, ...] = ()) -> Summary:
        plan = self._plan(data, hardware.batch_size, run.dist)
        optimization.set_global_batch(plan.global_batch)
        optimization.set_steps_per_epoch(plan.steps_per_epoch)  # for optim.warmup_epochs
        device = hardware.device
        model.to(device)
        optimizer = optimization.build(model, fused=device.type == "cuda")
        scaler = hardware.grad_scaler()
        if run.dist.is_main:
            _remove_stale_temporaries(run.run_dir)
        progress = self._resume(model, optimizer, scaler, plan, run)
        first_step = progress.step
        step_model = self._wrap(model, hardware, run.dist)
        sampler, loader = self._loader(data, collator, hardware, run)
        meter = _Meter(device, len(data.names))
        logger.start(run.run_dir, run.config, plan.total, progress.step, enabled=run.dist.is_main)
        try:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            for epoch in range(progress.step // plan.steps_per_epoch, self.epochs):
                for batches in self._epoch(sampler, loader, epoch, progress.step, plan):
                    for micro, batch in enumerate(batches):
                        batch = data.to_device(batch, device)
                        if progress.step == 0 and micro == 0 and run.dist.is_main:
                            logger.image("masks", mask_picture(batch.images, batch.context, batch.targets,
                                                               model.grid_size))
                        last = micro == len(batches) - 1
                        with contextlib.nullcontext() if last or not run.dist.enabled else step_model.no_sync():
                            out = forward_backward(step_model, normalize(batch.images), batch.context,
                                                   batch.targets, hardware.autocast(), scaler, self.grad_accum)
                        meter.add(out, batch.sources)
                    lr, wd = optimization.apply(optimizer, progress.step, plan.total)
                    momentum = optimization.momentum_at(progress.step, plan.total)
                    optimizer_update(model, optimizer, scaler, self.clip_grad, momentum)
                    progress.step += 1

                    final = progress.step == plan.total
                    if progress.step % self.log_every == 0 or final:
                        self._log(logger, meter, progress, plan, data, run.dist, epoch, lr, wd, momentum)
                    if progress.step % self.checkpoint_every == 0 and not final:
                        self._checkpoint(meter, progress, plan, model, optimizer, scaler, run)
                    if self._should_stop(progress.step, run.dist, device) and not final:
                        self._checkpoint(meter, progress, plan, model, optimizer, scaler, run)
                        logger.write(f"stop requested: saved {progress.last_good} at step {progress.step}")
                        return Summary(status="interrupted", steps=progress.step, checkpoint=str(progress.last_good),
                                       wall_time_s=progress.wall)
                self._checkpoint(meter, progress, plan, model, optimizer, scaler, run)
                self._snapshot(epoch, progress, run)
                self._epoch_end(callbacks, model, epoch + 1, logger, progress.step, run.dist)
        finally:
            logger.close()

        return Summary(
            status="completed", steps=progress.step, epochs=self.epochs, global_batch=plan.global_batch,
            checkpoint=str(runs.last_checkpoint(run.run_dir)), wall_time_s=progress.wall,
            resumed_from_step=first_step if first_step else None,
            final_loss=progress.last_metrics.get("loss"), img_per_s=progress.last_metrics.get("img_per_s"),
        )

    # ------------------------------------------------------------------ its steps

    def _plan(self, data: Mixture, batch: int, dist: DistInfo) -> _Plan:
        global_batch = batch * dist.world_size * self.grad_accum
        steps_per_epoch = data.epoch_length // dist.world_size // batch // self.grad_accum
        if steps_per_epoch < 1:
            raise ConfigError(
                f"an epoch has {data.epoch_length} images, fewer than one optimizer step needs "
                f"({global_batch} = hardware.batch_size {batch} x {dist.world_size} processes x "
                f"trainer.grad_accum {self.grad_accum}); lower the batch size or use more data"
            )
        return _Plan(batch, global_batch, steps_per_epoch, self.epochs * steps_per_epoch, data.epoch_length)

    def _resume(self, model: nn.Module, optimizer, scaler, plan: _Plan, run: RunContext) -> _Progress:
        """Load the checkpoint `resume` names (if any) into the model and optimizer."""
        source = self._resume_source(run.run_dir / runs.CHECKPOINTS)
        if source is None:
            if run.dist.is_main:
                print(f"starting a new run in {run.run_dir}", flush=True)  # the logger starts later
            return _Progress(step=0, last_good=None)
        source, state = self._load(source)
        ckpt.check_compatible(state["model"], model, str(source))
        if state["global_batch"] != plan.global_batch or state["epoch_length"] != plan.epoch_length:
            raise CheckpointError(
                f"checkpoint {source} was trained with global batch {state['global_batch']} and "
                f"{state['epoch_length']} images per epoch; this run has {plan.global_batch} and "
                f"{plan.epoch_length}. Resume with the same data, hardware.batch_size, processes and trainer.grad_accum"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        step = int(state["step"])
        if run.dist.is_main:
            print(f"resumed from {source} at step {step}/{plan.total}", flush=True)
        return _Progress(step=step, last_good=source, earlier_wall=float(state.get("wall_time_s", 0.0)), step_log=step)

    def _load(self, source: Path) -> tuple[Path, dict]:
        """The checkpoint at `source`; with resume=auto, a corrupt last.pt falls back to the
        newest snapshot (epoch_NNNN.pt) that loads."""
        try:
            return source, ckpt.load(source)
        except CheckpointError as e:
            if self.resume != "auto":
                raise
            for snapshot in sorted(source.parent.glob("epoch_*.pt"), reverse=True):
                try:
                    state = ckpt.load(snapshot)
                except CheckpointError:
                    continue
                print(f"{source} is corrupt ({e}); resuming from {snapshot} instead", flush=True)
                return snapshot, state
            raise CheckpointError(
                f"{e}\n  and there is no earlier snapshot (trainer.snapshot_every) to resume from: delete it to "
                "start over, or choose a new run directory (hydra.run.dir=...)"
            ) from None

    def _resume_source(self, ckpt_dir: Path) -> Optional[Path]:
        last = ckpt_dir / runs.LAST
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

    @staticmethod
    def _wrap(model: nn.Module, hardware: Hardware, dist: DistInfo) -> nn.Module:
        """The module the step calls: DDP around the model for several processes, compiled on request."""
        step_model = model
        if dist.enabled:
            device = hardware.device
            step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(step_model) if hardware.compile else step_model

    @staticmethod
    def _loader(data: Mixture, collator: Callable, hardware: Hardware, run: RunContext
                ) -> tuple[MixtureSampler, DataLoader]:
        sampler = MixtureSampler(data, seed=run.seed, rank=run.dist.rank, world_size=run.dist.world_size)
        loader = DataLoader(
            data, batch_size=hardware.batch_size, sampler=sampler, collate_fn=collator, drop_last=True,
            worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(run.seed),
            **hardware.loader_kwargs(),
        )
        return sampler, loader

    def _epoch(self, sampler: MixtureSampler, loader: DataLoader, epoch: int, step: int, plan: _Plan
               ) -> Iterator[list[Batch]]:
        """The rest of epoch `epoch` from optimizer step `step`: grad_accum batches per step."""
        first = step - epoch * plan.steps_per_epoch
        sampler.set_epoch(epoch)
        sampler.set_position(first * self.grad_accum * plan.batch)
        batches = iter(loader)
        for _ in range(first, plan.steps_per_epoch):
            yield [next(batches) for _ in range(self.grad_accum)]

    def _log(self, logger: Logger, meter: "_Meter", progress: _Progress, plan: _Plan, data: Mixture,
             dist: DistInfo, epoch: int, lr: float, wd: float, momentum: float) -> None:
        now = time.perf_counter()
        step = progress.step
        metrics = meter.flush(dist, step, progress.last_good)
        metrics.update(epoch=epoch + (step - epoch * plan.steps_per_epoch) / plan.steps_per_epoch, lr=lr,
                       weight_decay=wd, momentum=momentum,
                       img_per_s=(step - progress.step_log) * plan.global_batch / max(now - progress.t_log, 1e-9))
        metrics.update({f"draws/{n}": v for n, v in zip(data.names, metrics.pop("draws"))})
        if data.num_skipped:
            metrics["data/skipped_images"] = data.num_skipped
        logger.log(metrics, step)
        logger.progress(step, loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{metrics['img_per_s']:.0f}")
        progress.t_log, progress.step_log, progress.last_metrics = now, step, metrics

    def _checkpoint(self, meter: "_Meter", progress: _Progress, plan: _Plan, model: nn.Module, optimizer,
                    scaler, run: RunContext) -> None:
        """Rewrite last.pt (rank 0), once every rank's losses since the last check are finite
        and so are the weights and the optimizer state (an update after a finite loss can
        still break them): nothing non-finite is ever saved."""
        meter.check_finite(run.dist, progress.step, progress.last_good)
        bad = ckpt.non_finite({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        if bad:
            where = (f"the last good checkpoint is {progress.last_good}" if progress.last_good
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"the weights became NaN or infinite between step {meter.checked_step} and step {progress.step} "
                f"although the loss was finite ({len(bad)} tensors, e.g. {bad[0]}); training stopped and {where}. "
                "Try a lower optim.lr, trainer.clip_grad=1.0, or hardware.precision=bf16/fp32."
            )
        path = runs.last_checkpoint(run.run_dir)
        if run.dist.is_main:
            step = progress.step
            ckpt.save({
                "format": ckpt.FORMAT,
                "step": step,
                "epoch": step // plan.steps_per_epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                # Where the data stream stands (the resume itself recomputes it from the step).
                "sampler": {"epoch": step // plan.steps_per_epoch,
                            "position": step % plan.steps_per_epoch * self.grad_accum * plan.batch},
                "rng": ckpt.rng_state(),
                "config": run.config_yaml,
                "global_batch": plan.global_batch,
                "epoch_length": plan.epoch_length,
                "wall_time_s": progress.wall,
            }, path)
        progress.last_good = path

    def _snapshot(self, epoch: int, progress: _Progress, run: RunContext) -> None:
        """Keep a copy of last.pt as epoch_NNNN.pt every `snapshot_every` epochs."""
        if self.snapshot_every and (epoch + 1) % self.snapshot_every == 0 and run.dist.is_main:
            source = progress.last_good

            def copy(f) -> None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f)

            atomic_write(source.with_name(f"epoch_{epoch + 1:04d}.pt"), copy)

    @staticmethod
    def _epoch_end(callbacks: tuple[Callback, ...], model: nn.Module, epoch: int, logger: Logger, step: int,
                   dist: DistInfo) -> None:
        if not callbacks:
            return
        if dist.is_main:
            for callback in callbacks:
                metrics = callback.on_epoch_end(model, epoch, logger)
                if metrics:
                    logger.log(metrics, step)
        barrier(dist)

    def _should_stop(self, step: int, dist: DistInfo, device: torch.device) -> bool:
        # A signal reaches the ranks at different moments, but all must save and return at
        # the same step: they agree at the logging steps, which wait for the device anyway.
        if not dist.enabled:
            return self.stop_requested(step)
        return step % self.log_every == 0 and any_rank(self.stop_requested(step), dist, device)


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
