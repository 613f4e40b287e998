"""The config tree composes for every option, and bad keys or types fail before any work."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from hjepa.config import build, validate
from hjepa.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["dataset", "mixture", "transform", "mask", "model", "optim", "trainer", "hardware", "logger", "monitor",
          "experiment"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path, compose_config):
    extra = [f"dataset.root={tmp_path}"] if option in ("image_folder", "prepared") else []
    cfg = validate(compose_config(f"{group}={option}", *extra))
    assert (cfg.dataset is None) != (cfg.mixture is None)
    # the cheap parts build, and the masks fit the model's patch grid
    assert cfg.image_size % cfg.patch_size == 0
    grid = cfg.image_size // cfg.patch_size
    build(cfg.mask, grid_size=[grid, grid]).sample(2, torch.Generator().manual_seed(0))
    for node in (cfg.transform, cfg.optim, cfg.trainer, cfg.monitor, cfg.logger):
        build(node)


def test_unknown_key_in_a_group_is_an_error(compose_config):
    with pytest.raises(ConfigError, match=r"model\.dropout_rate: unknown key for HJEPA"):
        validate(compose_config("+model.dropout_rate=0.1"))


def test_unknown_top_level_key_is_an_error(compose_config):
    with pytest.raises(ConfigError, match="learning_rate: unknown key"):
        validate(compose_config("+learning_rate=0.1"))


def test_misspelled_override_is_rejected_by_hydra(compose_config):
    with pytest.raises(ConfigCompositionException, match="epoch"):
        compose_config("trainer.epoch=3")


@pytest.mark.parametrize("override,message", [
    ("trainer.epochs=ten", r"trainer\.epochs: expected int, got 'ten'"),
    ("hardware.precision=fp8", r"hardware\.precision: expected one of 'auto', 'bf16', 'fp16', 'fp32'"),
    ("optim.lr=fast", r"optim\.lr: expected float"),
    ("mixture=foundation_mini", None),
])
def test_wrong_types_are_errors(override, message, compose_config):
    if message is None:
        with pytest.raises(ConfigError, match=r"mixture\.strategy: expected one of"):
            validate(compose_config(override, "mixture.strategy=random"))
    else:
        with pytest.raises(ConfigError, match=message):
            validate(compose_config(override))


def test_mixture_component_without_dataset_is_an_error(compose_config):
    with pytest.raises(ConfigError, match=r"mixture\.components\.extra\.dataset: missing"):
        validate(compose_config("mixture=foundation_mini", "+mixture.components.extra.weight=0.5"))


def test_mixture_sets_the_resolution_and_clears_dataset(compose_config):
    cfg = validate(compose_config("mixture=foundation_mini", "mixture.components.imagenet100.weight=0.5"))
    assert cfg.dataset is None and cfg.image_size == 224
    assert cfg.mixture.components.imagenet100.weight == 0.5


def test_missing_device_is_a_clear_error(compose_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        build(validate(compose_config("hardware=gpu")).hardware)


def test_auto_hardware_picks_a_present_device(compose_config):
    hw = build(validate(compose_config("hardware=auto")).hardware)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert hw.device.type == expected


@pytest.mark.parametrize("overrides,expect", [
    (["dataset=imagenet100", "hardware=m1_max"], ["subset: imagenet100", "device: mps", "batch_size: 32"]),
    (["mixture=foundation_mini"], ["imagenet100:", "weight: 0.6", "stl10:", "cifar100:"]),
])
def test_cfg_job_prints_the_composed_config(overrides, expect):
    out = subprocess.run([sys.executable, "-m", "hjepa.train", "--cfg", "job", *overrides],
                         capture_output=True, text=True, cwd=CONF.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    for text in expect:
        assert text in out.stdout


@pytest.mark.parametrize("module,groups,unused", [
    ("hjepa.train", GROUPS, []),
    ("hjepa.evaluate", ["eval", "hardware", "dataset"], ["model", "mixture", "trainer", "optim"]),
    ("hjepa.data.verify", ["dataset", "mixture", "transform"], ["model", "eval", "trainer", "optim"]),
])
def test_help_is_short_with_examples_and_the_groups_each_command_uses(module, groups, unused):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                         cwd=CONF.parent).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"python -m {module} ") and "Examples:" in lines
    assert "Powered by Hydra" not in out and "== Config ==" not in out and len(lines) < 60
    listed = {line.split(":")[0].strip(): line for line in lines if ": " in line and not line.startswith("  python")}
    for group in groups:  # every option of the group, as conf/ has them
        assert all(option in listed[group] for option in _options(group)), (group, listed.get(group))
    assert not set(unused) & set(listed)
