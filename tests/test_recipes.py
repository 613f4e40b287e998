"""The named recipes (conf/experiment/) compose to what their comments promise. (That every
experiment option composes and validates is tests/test_config.py's job.)"""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from hjepa import CONF_DIR
from hjepa.config import build, validate

RECIPES = ["imagenet100_vits_100ep_m1max", "foundation_vits_100ep", "imagenet100_mixture_sweep"]


def compose_with_hydra(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", RECIPES)
def test_every_number_in_a_recipe_is_measured_or_says_not_measured(name):
    text = (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text()
    assert "not measured" in text


def test_imagenet100_on_an_m1_max(compose_config, imagenet_tree, tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    cfg = validate(compose_config("experiment=imagenet100_vits_100ep_m1max", f"dataset.root={root}"))
    assert cfg.dataset.subset == "imagenet100" and cfg.mixture is None
    assert (cfg.model.arch, cfg.image_size, cfg.patch_size) == ("vit_small_patch16_224", 224, 16)
    assert (cfg.hardware.device, cfg.hardware.precision, cfg.hardware.batch_size) == ("mps", "fp16", 32)
    assert (cfg.trainer.epochs, cfg.trainer.grad_accum) == (100, 4)
    optim = build(cfg.optim)
    optim.set_global_batch(32 * 4)  # one process
    assert optim.lr_at(100, 1000) == pytest.approx(5e-4)  # the peak, after 10% warmup
    # it reads ImageNet-100 from an ImageNet folder (here built from the real samples)
    assert len(build(cfg.dataset)) == 100


def test_the_foundation_mixture(compose_config):
    cfg = validate(compose_config("experiment=foundation_vits_100ep", "data_root=/data"))
    assert cfg.dataset is None
    parts = cfg.mixture.components
    assert {n: c.weight for n, c in parts.items()} == {"imagenet100": 0.6, "stl10": 0.3, "cifar100": 0.1}
    assert parts.imagenet100.dataset.root == "/data/imagenet" and parts.imagenet100.dataset.subset == "imagenet100"
    assert parts.stl10.dataset.split == "train+unlabeled"
    assert (cfg.model.arch, cfg.image_size, cfg.trainer.epochs, cfg.hardware.device) == (
        "vit_small_patch16_224", 224, 100, "cuda")


def test_the_imagenet100_mixture_sweep_is_four_valid_jobs(compose_config):
    cfg = compose_with_hydra("experiment=imagenet100_mixture_sweep")
    params = cfg.hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    assert sorted(map(tuple, jobs)) == [
        (f"mixture.components.imagenet100.weight={w}", f"trainer.epochs={e}") for w in ("0.5", "0.7")
        for e in ("100", "300")]
    for job in jobs:
        job_cfg = validate(compose_config("experiment=imagenet100_mixture_sweep", *job))
        assert set(job_cfg.mixture.components) == {"imagenet100", "stl10", "cifar100"}
        assert f"trainer.epochs={job_cfg.trainer.epochs}" in job
