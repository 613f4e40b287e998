"""`python -m hjepa.evaluate run=<run dir> eval=knn|linear|attentive [dataset=<name>] [ckpt=<file>]`

Scores the frozen target encoder of a training run. The model is rebuilt from the run's own
<run dir>/config.yaml and loaded from checkpoints/last.pt (or `ckpt=`); a checkpoint of
another shape is refused. Images go through the eval transform at the model's resolution
(the run's image_size, whatever dataset is evaluated); features are extracted once in eval
mode and cached in <run dir>/eval_cache/, keyed by everything that changes them. The same
protocol then runs on a randomly initialised encoder of the same shape and seed, and
<run dir>/eval_<protocol>.json records both and the gain; a one-line table goes to stdout.

Data: the run's dataset (for a mixture, the first component with a labeled eval split),
or `dataset=<option>` (any conf/dataset option, e.g. dataset=imagenet100 dataset.root=...).
Eval splits: ImageNet(-100) val, CIFAR / STL-10 test, synthetic val, image_folder its
val_root or holdout; a dataset without one is scored on a fixed 10% per class held out of
its labeled split (hjepa.eval.splits).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from hjepa import CONF_DIR, runs
from hjepa.atomic import atomic_write
from hjepa.config import build, check_against, check_targets, dataset_configs
from hjepa.data.transforms import eval_transform
from hjepa.errors import ConfigError, HJEPAError
from hjepa.eval.features import cached, extract
from hjepa.eval.splits import labeled_splits, labels_of, stratified_split


@dataclass
class EvaluateConfig:
    """The top level of conf/evaluate.yaml."""

    run: str
    eval: dict
    hardware: dict
    ckpt: Optional[str] = None
    crop_ratio: float = 0.875
    batch_size: int = 256
    data_root: str = "data"
    dataset: Optional[dict] = None
    # Set by the dataset=... options (their native resolution); not used: the model's is.
    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    # The training recipe some dataset options carry (dataset=synthetic); not used: the run's is.
    model: Optional[dict] = None
    trainer: Optional[dict] = None
    optim: Optional[dict] = None


def evaluate(cfg: DictConfig, dataset_name: Optional[str] = None) -> dict[str, Any]:
    cfg = _validate(cfg)
    run_cfg, model, ckpt_path, step = runs.load_run(cfg.run, cfg.ckpt)
    run_dir = Path(cfg.run).expanduser()
    protocol = build(cfg.eval)
    hardware = build(cfg.hardware)
    threads = torch.get_num_threads()
    torch.set_num_threads(hardware.threads)
    try:
        return _evaluate(cfg, run_cfg, model, ckpt_path, step, run_dir, protocol, hardware, dataset_name)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: DictConfig, run_cfg: DictConfig, model: torch.nn.Module, ckpt_path: Path, step: int,
              run_dir: Path, protocol: Any, hardware: Any, dataset_name: Optional[str]) -> dict[str, Any]:
    device = hardware.device

    if cfg.get("dataset") is not None:
        configs = dataset_configs(cfg, dataset_name)
    else:
        configs = dataset_configs(run_cfg)
    transform = eval_transform(run_cfg.image_size, cfg.crop_ratio)
    data = labeled_splits(configs, transform)
    encoders = {"trained": model.target_encoder, "random_init": runs.random_model(run_cfg).target_encoder}
    del model  # only the target encoders are needed
    limit = None
    if protocol.kind == "tokens":
        limit = protocol.max_images(encoders["trained"].patch_embed.num_patches, encoders["trained"].embed_dim)
    splits = {"train": (_cap(data.train, limit), data.train_split), "eval": (_cap(data.eval, limit), data.eval_split)}

    key = {"kind": protocol.kind, "dataset": OmegaConf.to_container(configs[data.name]),
           "transform": {"size": run_cfg.image_size, "crop_ratio": cfg.crop_ratio}}
    model_keys = {"trained": {"checkpoint": str(ckpt_path.resolve()), "step": step,
                             "mtime_ns": ckpt_path.stat().st_mtime_ns},
                  "random_init": {"model": OmegaConf.to_container(run_cfg.model), "seed": run_cfg.seed}}
    scores = {}
    for which, encoder in encoders.items():
        encoder.to(device)
        features = {}
        for side, (dataset, split) in splits.items():
            what = f"{which.replace('_', '-')} encoder, {data.name} {split} ({len(dataset)} images)"
            features[side] = cached(
                run_dir / runs.EVAL_CACHE, {**key, **model_keys[which], "split": split, "num_images": len(dataset)},
                lambda: extract(encoder, dataset, protocol.kind, device, cfg.batch_size, hardware.num_workers,
                                hardware.autocast, progress=what),
                on_hit=lambda: print(f"features of the {what}: from {run_dir / runs.EVAL_CACHE}", flush=True))
        encoder.cpu()
        scores[which] = protocol(features["train"], features["eval"], len(data.classes), device)

    result = {
        "protocol": protocol.name, "settings": protocol.settings(),
        "run": str(run_dir), "checkpoint": str(ckpt_path), "step": step,
        "arch": run_cfg.model.arch, "image_size": run_cfg.image_size, "crop_ratio": cfg.crop_ratio,
        "dataset": data.name, "train_split": data.train_split, "eval_split": data.eval_split,
        "num_train": len(splits["train"][0]), "num_eval": len(splits["eval"][0]), "num_classes": len(data.classes),
        "trained": scores["trained"], "random_init": scores["random_init"],
        "gain_top1": scores["trained"]["top1"] - scores["random_init"]["top1"],
        "gain_top5": scores["trained"]["top5"] - scores["random_init"]["top5"],
    }
    atomic_write(runs.eval_result(run_dir, protocol.name), json.dumps(result, indent=2))
    print(_table(result))
    return result


def _validate(cfg: DictConfig) -> DictConfig:
    if OmegaConf.is_missing(cfg, "run"):
        raise ConfigError("run=<run dir> is required: the folder python -m hjepa.train wrote")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # omegaconf's MissingMandatoryValue, InterpolationResolutionError, ...
        raise ConfigError(f"config cannot be resolved: {e}") from None
    check_against(plain, EvaluateConfig, "")
    check_targets(plain, "")
    return OmegaConf.create(plain)


def _cap(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """At most `limit` items: a seeded class-stratified subset (rounding per class can
    overshoot by a few, which a seeded random trim removes)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    _, keep = stratified_split(labels_of(dataset), limit / len(dataset), seed=0)
    keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))[:limit]].sort().values
    return Subset(dataset, keep.tolist())


def _table(r: dict) -> str:
    header = (f"{'eval':<10} {'dataset':<16} {'train -> eval split':<24} {'n train':>8} {'n eval':>7} "
              f"{'top-1':>6} {'top-5':>6} {'random-init top-1':>17} {'gain':>6}")
    row = (f"{r['protocol']:<10} {r['dataset']:<16} {r['train_split'] + ' -> ' + r['eval_split']:<24} "
           f"{r['num_train']:>8} {r['num_eval']:>7} {r['trained']['top1']:>6.1f} {r['trained']['top5']:>6.1f} "
           f"{r['random_init']['top1']:>17.1f} {r['gain_top1']:>+6.1f}")
    return f"{header}\n{row}"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg, dataset_name=HydraConfig.get().runtime.choices.get("dataset"))
    except HJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
