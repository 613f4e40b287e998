"""`python -m hjepa.train [overrides]`: pretrain H-JEPA on the composed config.

This is the composition root: it validates the config, builds every object with
`hydra.utils.instantiate` (through `hjepa.config.build`) and hands them to the Trainer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hjepa import CONF_DIR, runs
from hjepa.atomic import DISK_FULL, atomic_write
from hjepa.config import build, dataset_configs, validate
from hjepa.data.mixture import Mixture, normalize_weights
from hjepa.data.transforms import eval_transform
from hjepa.engine.distributed import DistInfo, barrier, broadcast, export_task_env, init_distributed, shutdown
from hjepa.engine.preemption import StopSignals
from hjepa.engine.trainer import RunContext
from hjepa.errors import ConfigError, DataError, HJEPAError, MissingDataError, OutputError
from hjepa.eval.splits import labeled_splits
from hjepa.runs import Summary


def build_train_data(cfg: DictConfig, configs: dict[str, DictConfig], transform: Any) -> Mixture:
    """The training stream: the mixture, or the single dataset as a one-component mixture.
    Every dataset that cannot be opened is named in one error, with the key that sets its root."""
    if cfg.mixture is not None:
        # Weights are checked before any dataset is opened: a typo fails in milliseconds.
        weights = normalize_weights({n: float(c.weight) for n, c in cfg.mixture.components.items()})
    datasets, problems = {}, []
    for name, config in configs.items():
        key = "dataset" if cfg.mixture is None else f"mixture.components.{name}.dataset"
        try:
            datasets[name] = build(config, transform=transform)
        except MissingDataError as e:
            problems.append(f"{name}: {e}\n  (set {key}.root=<folder>, or data_root=<the folder holding your datasets>)")
        except DataError as e:
            problems.append(f"{name}: {e}")
    if problems:
        what = "the dataset" if cfg.mixture is None else f"{len(problems)} of the {len(configs)} mixture components"
        raise DataError(f"{what} cannot be read:\n" + "\n".join(problems) +
                        "\nCheck the data with: python -m hjepa.data.verify <the same overrides>")
    if cfg.mixture is None:
        return Mixture(datasets, strategy="concat", seed=cfg.seed)
    return Mixture(datasets, weights, strategy=cfg.mixture.strategy, epoch_length=cfg.mixture.epoch_length,
                   seed=cfg.seed)


def train(cfg: DictConfig, run_dir: Path, dataset_name: Optional[str] = None) -> Summary:
    """Train on the composed `cfg` into `run_dir`; `dataset_name` names a single dataset
    (its config option) in metrics and the summary."""
    cfg = validate(cfg)
    export_task_env()  # before the device is chosen: Hardware takes cuda:LOCAL_RANK
    hardware = build(cfg.hardware)
    threads = torch.get_num_threads()
    torch.set_num_threads(hardware.threads)
    dist = init_distributed(hardware.device.type)
    try:
        # Every rank resumes from and reports to rank 0's run directory (see `cli`).
        run_dir = Path(broadcast(str(Path(run_dir).absolute()), dist))
        return _train(cfg, run_dir, dataset_name, hardware, dist)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        last = runs.last_checkpoint(run_dir)
        resume = f"; free some space and run the same command to resume from {last}" if last.exists() else ""
        raise OutputError(f"no space left on device: writing {e.filename or run_dir} failed "
                          f"({_free(run_dir)} free){resume}") from None
    finally:
        shutdown(dist)
        torch.set_num_threads(threads)


def _train(cfg: DictConfig, run_dir: Path, dataset_name: Optional[str], hardware: Any, dist: DistInfo) -> Summary:
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    trainer = build(cfg.trainer)
    optimization = build(cfg.optim)
    logger = build(cfg.logger)
    monitor = build(cfg.monitor)
    collator = build(cfg.mask, grid_size=list(model.grid_size))
    configs = dataset_configs(cfg, dataset_name)
    data = build_train_data(cfg, configs, build(cfg.transform))
    run = RunContext(run_dir, config=OmegaConf.to_container(cfg), config_yaml=OmegaConf.to_yaml(cfg),
                     seed=cfg.seed, dist=dist)

    # A rerun of a completed run keeps its summary unless it trains further (hjepa.runs).
    previous = runs.read_summary(run_dir)
    rerun = previous is not None and previous.status == "completed"
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / runs.CONFIG, run.config_yaml)
        if not rerun:
            runs.write_summary(run_dir, Summary(status="running", started=time.time()))
        params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
        print(f"hjepa: {cfg.model.arch} ({params:.1f}M params, {cfg.image_size}px, patch {cfg.patch_size}, "
              f"{len(cfg.model.levels)} level(s)) on {hardware.describe()}, {dist.world_size} process(es)")
        for name, s in data.stats().items():
            print(f"  data {name}: {s['size']} images, weight {s['weight']:.3f}, "
                  f"{s['expected_draws']:.0f} draws/epoch")

    if monitor.enabled:
        splits = labeled_splits(configs, eval_transform(cfg.image_size, monitor.crop_ratio))
        monitor.attach(splits.train, splits.eval, device=hardware.device, num_workers=hardware.num_workers,
                       autocast=hardware.autocast)

    with StopSignals(trainer.request_stop) as signals:
        summary = trainer.fit(model, optimization, hardware, data, collator, logger, run,
                              callbacks=(monitor,) if monitor.every_epochs else ())
    if rerun and summary.status == "completed" and summary.resumed_from_step == summary.steps:
        if dist.is_main:
            print(f"nothing to do: {run_dir} has completed its {summary.steps} steps; its summary is kept "
                  f"({run_dir / runs.SUMMARY})")
        return previous
    summary.mixture = data.stats()
    summary.stopped_by = signals.name if summary.status == "interrupted" else None
    if dist.is_main:
        if summary.status == "completed" and monitor.at_end:
            _score_against_random_init(summary, monitor, model, cfg)
        runs.write_summary(run_dir, summary)
        if summary.status == "completed":
            print(f"checkpoint: {summary.checkpoint}\nmetrics:    {run_dir / runs.METRICS}\n"
                  f"config:     {run_dir / runs.CONFIG}\nsummary:    {run_dir / runs.SUMMARY}")
    barrier(dist)
    if summary.status == "interrupted":
        signals.pass_on()  # the preemption signal under submitit: resubmit this job, requeue it and exit
    return summary


def _score_against_random_init(summary: Summary, monitor: Any, model: torch.nn.Module, cfg: DictConfig) -> None:
    """kNN of the trained target encoder and of the run's own random initialisation."""
    trained = monitor.evaluate(model)
    baseline = monitor.baseline(lambda: runs.random_model(cfg))
    summary.knn_top1, summary.knn_top5 = trained["knn/top1"], trained["knn/top5"]
    summary.random_init_knn_top1 = baseline["knn/top1"]
    summary.feature_std = trained["features/std"]
    summary.feature_effective_rank = trained["features/effective_rank"]
    print(f"kNN top-1 on {len(monitor.queries)} held-out images (k={monitor.k}): "
          f"trained {trained['knn/top1']:.1f}%  vs  random init {baseline['knn/top1']:.1f}%")
    summary.collapse_warning = monitor.warning(trained)
    if summary.collapse_warning:
        print(summary.collapse_warning)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    export_task_env()  # RANK for the error paths below, also under submitit
    is_main = int(os.environ.get("RANK", "0")) == 0
    with runs.copy_output(run_dir / runs.TRAIN_LOG) if is_main else contextlib.nullcontext():
        return _main(cfg, hc, run_dir, is_main)


def _main(cfg: DictConfig, hc: Any, run_dir: Path, is_main: bool) -> Optional[float]:
    try:
        if cfg.get("mixture") is not None and any(o.startswith("dataset=") for o in hc.overrides.task):
            raise ConfigError("dataset=... and mixture=... both given: a mixture names its own datasets "
                              "(mixture.components.<name>.dataset); choose one")
        summary = train(cfg, run_dir, dataset_name=hc.runtime.choices.get("dataset"))
    except HJEPAError as e:
        if is_main:
            _record_failure(run_dir, str(e))
        if hc.mode == RunMode.MULTIRUN:
            raise  # the launcher records this job as failed and carries on with the sweep
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a new checkpoint
        if is_main:
            _record_failure(run_dir, "stopped by a second Ctrl-C", status="interrupted")
        print(f"stopped by Ctrl-C; run the same command to resume from {runs.last_checkpoint(run_dir)}",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except BaseException as e:
        if is_main and not isinstance(e, SystemExit):
            _record_failure(run_dir, f"{type(e).__name__}: {e}")
        raise
    if summary.stopped_by in ("SIGTERM", "SIGINT"):
        print(f"interrupted by {summary.stopped_by} at step {summary.steps}: saved {summary.checkpoint}; "
              "run the same command to resume", flush=True)
        sys.exit(128 + signal.Signals[summary.stopped_by])
    return summary.final_loss


def _record_failure(run_dir: Path, error: str, status: str = "failed") -> None:
    """Say in summary.json how the run ended, best effort (the disk may be full). A completed
    run keeps its results: a rerun's failure is recorded beside them."""
    if not run_dir.exists():
        return
    previous = runs.read_summary(run_dir)
    if previous is not None and previous.status == "completed":
        summary = previous
        summary.rerun_error = error
    else:
        summary = Summary(status=status, error=error)
    try:
        runs.write_summary(run_dir, summary)
    except OSError as e:
        print(f"(could not record this in {run_dir / runs.SUMMARY}: {e.strerror})", file=sys.stderr)


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def cli() -> None:
    """`python -m hjepa.train`. torchrun starts every rank with the same command line, but
    only rank 0 may create the run directory (a timestamped name can differ between ranks)
    and write Hydra's files into it: ranks > 0 get none of their own and learn rank 0's
    when the process group starts (`train`)."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    # Hydra finds launchers by listing the hydra_plugins package, which an editable install's
    # import hook does not list: register ours (hydra/launcher=slurm) by hand.
    from hydra.core.plugins import Plugins
    from hydra_plugins.hjepa_launcher import SlurmLauncher

    Plugins.instance().register(SlurmLauncher)
    main()


if __name__ == "__main__":
    cli()
