"""`python -m hjepa.train [overrides]`: pretrain H-JEPA on the composed config.

This is the composition root: it validates the config, builds every object with
`hydra.utils.instantiate` (through `hjepa.config.build`) and hands them to the Trainer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hjepa.config import build, validate
from hjepa.data.mixture import Mixture, normalize_weights
from hjepa.data.transforms import eval_transform
from hjepa.engine.distributed import DistInfo, barrier, broadcast, export_task_env, init_distributed, shutdown
from hjepa.engine.preemption import PreemptionSignal
from hjepa.errors import ConfigError, HJEPAError
from hjepa.eval.splits import labeled_splits


def build_train_data(cfg: DictConfig, transform: Any, name: str = "dataset") -> Mixture:
    """The training stream: the mixture, or the single dataset as a one-component mixture."""
    if cfg.mixture is None:
        if cfg.dataset is None:
            raise ConfigError("no training data: set dataset=<name> or mixture=<name>")
        return Mixture({name: build(cfg.dataset, transform=transform)}, strategy="concat", seed=cfg.seed)
    components = cfg.mixture.components
    # Weights are checked before any dataset is opened: a typo fails in milliseconds.
    weights = normalize_weights({n: float(c.weight) for n, c in components.items()})
    datasets = {n: build(c.dataset, transform=transform) for n, c in components.items()}
    return Mixture(datasets, weights, strategy=cfg.mixture.strategy, epoch_length=cfg.mixture.epoch_length,
                   seed=cfg.seed)


def monitor_data(cfg: DictConfig, train_data: Mixture, eval_tf: Any) -> Optional[tuple[Any, Any]]:
    """(labeled memory split, eval split) of the first dataset that has both, else the
    labeled split of the first dataset and a fixed held-out part of it (hjepa.eval.splits)."""
    if cfg.mixture is None:
        configs = {train_data.names[0]: cfg.dataset}
    else:
        configs = {n: cfg.mixture.components[n].dataset for n in train_data.names}
    splits = labeled_splits(configs, eval_tf)
    return splits.train, splits.eval


def train(cfg: DictConfig, run_dir: Path, dataset_name: str = "dataset") -> dict[str, Any]:
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
    finally:
        shutdown(dist)
        torch.set_num_threads(threads)


def _train(cfg: DictConfig, run_dir: Path, dataset_name: str, hardware: Any, dist: DistInfo) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    trainer = build(cfg.trainer)
    optimization = build(cfg.optim)
    logger = build(cfg.logger)
    monitor = build(cfg.monitor)
    collator = build(cfg.mask, grid_size=list(model.grid_size))
    data = build_train_data(cfg, build(cfg.transform), dataset_name)

    config = OmegaConf.to_container(cfg)
    config_yaml = OmegaConf.to_yaml(cfg)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        _write_summary(run_dir, {"status": "running", "started": time.time()})
        params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
        print(f"hjepa: {cfg.model.arch} ({params:.1f}M params, {cfg.image_size}px, patch {cfg.patch_size}, "
              f"{len(cfg.model.levels)} level(s)) on {hardware.describe()}, {dist.world_size} process(es)")
        for name, s in data.stats().items():
            print(f"  data {name}: {s['size']} images, weight {s['weight']:.3f}, "
                  f"{s['expected_draws']:.0f} draws/epoch")

    eval_pair = monitor_data(cfg, data, eval_transform(cfg.image_size, monitor.crop_ratio)) if monitor.enabled else None
    if eval_pair is not None:
        monitor.attach(*eval_pair, device=hardware.device, num_workers=hardware.num_workers,
                       autocast=hardware.autocast)

    def random_model() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)  # the very initialisation this run started from
        return build(cfg.model)

    def on_epoch_end(epoch: int, step: int) -> dict[str, float]:
        if eval_pair is None or not monitor.every_epochs or epoch % monitor.every_epochs:
            return {}
        metrics = monitor.evaluate(model) if dist.is_main else {}
        warning = monitor.warning(metrics) if dist.is_main else None
        if warning:
            logger.write(f"epoch {epoch}: {warning}")
        barrier(dist)
        return metrics

    with PreemptionSignal(trainer.request_stop) as preemption:
        result = trainer.fit(model=model, optimization=optimization, hardware=hardware, dataset=data,
                             collator=collator, run_dir=run_dir, logger=logger, config=config,
                             config_yaml=config_yaml, seed=cfg.seed, dist=dist, on_epoch_end=on_epoch_end)
    result["mixture"] = data.stats()
    if dist.is_main and result["status"] == "completed":
        if eval_pair is not None and monitor.at_end:
            trained = monitor.evaluate(model)
            baseline = monitor.baseline(random_model)
            result["knn_top1"], result["knn_top5"] = trained["knn/top1"], trained["knn/top5"]
            result["random_init_knn_top1"] = baseline["knn/top1"]
            result["feature_std"] = trained["features/std"]
            result["feature_effective_rank"] = trained["features/effective_rank"]
            print(f"kNN top-1 on {len(monitor.queries)} held-out images (k={monitor.k}): "
                  f"trained {trained['knn/top1']:.1f}%  vs  random init {baseline['knn/top1']:.1f}%")
            warning = monitor.warning(trained)
            if warning:
                result["collapse_warning"] = warning
                print(warning)
        _write_summary(run_dir, result)
        print(f"checkpoint: {result['checkpoint']}\nmetrics:    {run_dir / 'metrics.jsonl'}\n"
              f"config:     {run_dir / 'config.yaml'}\nsummary:    {run_dir / 'summary.json'}")
    elif dist.is_main:
        _write_summary(run_dir, result)
    barrier(dist)
    if result["status"] == "interrupted":
        preemption.pass_on()  # under submitit: resubmit this job, requeue it and exit
    return result


def _write_summary(run_dir: Path, data: dict[str, Any]) -> None:
    path = run_dir / "summary.json"
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    export_task_env()  # RANK for the error paths below, also under submitit
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        if cfg.get("mixture") is not None and any(o.startswith("dataset=") for o in hc.overrides.task):
            raise ConfigError("dataset=... and mixture=... both given: a mixture names its own datasets "
                              "(mixture.components.<name>.dataset); choose one")
        result = train(cfg, run_dir, dataset_name=hc.runtime.choices.get("dataset") or "dataset")
    except HJEPAError as e:
        if run_dir.exists() and is_main:
            _write_summary(run_dir, {"status": "failed", "error": str(e)})
        if hc.mode == RunMode.MULTIRUN:
            raise  # the launcher records this job as failed and carries on with the sweep
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException as e:
        if run_dir.exists() and is_main and not isinstance(e, SystemExit):
            _write_summary(run_dir, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        raise
    return result.get("final_loss")


def cli() -> None:
    """`python -m hjepa.train`. torchrun starts every rank with the same command line, but
    only rank 0 may create the run directory (a timestamped name can differ between ranks)
    and write Hydra's files into it: ranks > 0 get none of their own and learn rank 0's
    when the process group starts (`train`)."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    main()


if __name__ == "__main__":
    cli()
