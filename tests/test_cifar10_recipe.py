"""The CIFAR-10 recipe (experiments/cifar10): its configs for every data source, the data
packing for the GPU machine, and the CPU version of the recipe, which must beat random-init
features on held-out CIFAR-10 images. The GPU run of the recipe (and the hierarchy ablation)
is stage 2 (and 5) of experiments/gpu/run.sh, tested by tests/test_gpu_run.py."""

import json
import math
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.io import encode_jpeg

from hjepa import runs
from hjepa.config import validate
from hjepa.data.batch import AugmentParams
from hjepa.data.cache import DeviceAugment, augment_batch
from hjepa.data.torchvision_sets import CIFAR10
from hjepa.data.transforms import eval_transform, train_transform
from hjepa.errors import ConfigError
from hjepa.train import train

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_DIR = ROOT / "experiments" / "cifar10"
sys.path.insert(0, str(CIFAR10_DIR))
import cpu_table  # noqa: E402  (experiments/cifar10/cpu_table.py)
import pack  # noqa: E402  (experiments/cifar10/pack.py)

# experiment=cifar10_cpu_short: the kNN gain over random init (training-time monitor, 10,000 memory
# images) that the slow test asserts, below every seed measured (+8.4 for seed 0, which the test
# runs, and +7.6 for seed 1; experiments/cifar10/README.md).
SHORT_MARGIN = 6.0

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]



def _fake_cifar10(root: Path, per_batch: int = 4) -> torch.Tensor:
    """torchvision's cifar-10-batches-py layout with random pixels; returns the train images."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5 * per_batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = [i % 10 for i in range(len(images))]
    rows = images.reshape(len(images), -1).numpy()
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        (base / f"data_batch_{i + 1}").write_bytes(pickle.dumps({"data": rows[part], "labels": labels[part]}))
    (base / "test_batch").write_bytes(pickle.dumps({"data": rows[:10], "labels": labels[:10]}))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    return images


def _jpeg_tree(root: Path, per_class: int) -> Path:
    """<root>/<class>/NNNN.jpg with random 32 px images."""
    g = torch.Generator().manual_seed(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
            (root / name / f"{i:04d}.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())
    return root


# ---- configs -------------------------------------------------------------------------------

def test_gpu_recipe_composes_for_the_jpeg_folder_torchvision_and_image_folder(tmp_path, compose_config):
    jpeg = validate(compose_config("experiment=cifar10_vit_tiny"))
    assert jpeg.dataset._target_.endswith("ImageFolder") and jpeg.dataset.holdout == 500
    assert jpeg.dataset.cache == "device" and jpeg.hardware.device == "cuda"
    assert (jpeg.image_size, jpeg.patch_size, jpeg.hardware.batch_size) == (32, 4, 512)
    assert jpeg.model.arch == "vit_tiny_patch16_224" and jpeg.mask.min_keep == 4
    # The README's single commands for a user's own copy: torchvision's files or a JPEG folder.
    tv = validate(compose_config("experiment=cifar10_vit_tiny", "dataset=cifar10", f"dataset.root={tmp_path}"))
    assert tv.dataset._target_ == "hjepa.data.torchvision_sets.CIFAR10"
    assert tv.dataset.cache == "device" and tv.dataset.root == str(tmp_path)
    folder = validate(compose_config("experiment=cifar10_vit_tiny", f"dataset.root={tmp_path}"))
    assert folder.dataset.root == str(tmp_path) and folder.trainer.epochs == jpeg.trainer.epochs


def test_cpu_recipe_composes_and_is_the_same_recipe_scaled_down(compose_config):
    gpu, cpu = validate(compose_config("experiment=cifar10_vit_tiny")), validate(compose_config("experiment=cifar10_cpu"))
    assert cpu.hardware.device == "cpu" and cpu.model.arch == "test_vit"
    assert cpu.dataset._target_ == gpu.dataset._target_ and cpu.image_size == gpu.image_size == 32
    assert cpu.monitor.crop_ratio == gpu.monitor.crop_ratio == 1.0


def test_cpu_long_and_short_recipes_differ_only_in_epochs_and_run_on_one_core(tmp_path, compose_config):
    long = validate(compose_config("experiment=cifar10_cpu_long", f"data_root={tmp_path}"))
    short = validate(compose_config("experiment=cifar10_cpu_short", f"data_root={tmp_path}"))
    assert long.dataset.root == short.dataset.root == f"{tmp_path}/cifar10/train" and long.dataset.holdout == 500
    assert (long.hardware.device, long.hardware.threads, long.hardware.num_workers) == ("cpu", 1, 0)
    assert long.trainer.epochs * 703 <= 9_000 and short.trainer.epochs * 703 <= 3_000  # steps of 64 of 45,000
    a, b = (OmegaConf.to_container(c) for c in (long, short))
    a["trainer"].pop("epochs"), b["trainer"].pop("epochs")
    assert a == b
    # the ablation's level settings and the parity options compose on it
    for levels in ("ijepa", "hjepa3", "mid3", "mid3_s2"):
        validate(compose_config("experiment=cifar10_cpu_short", f"model/levels={levels}"))
    validate(compose_config("experiment=cifar10_cpu_short", "model.init=reference", "mask.geometry=reference",
                      "optim.warmup=null", "optim.warmup_epochs=1"))


# ---- torchvision CIFAR-10 kept decoded on the device ---------------------------------------

def test_torchvision_cifar10_cache_defers_the_augmentation_to_the_device(tmp_path):
    images = _fake_cifar10(tmp_path)
    tf = train_transform(32, [0.3, 1.0], [0.75, 4 / 3], 0.5, 0.0)
    ds = CIFAR10(str(tmp_path), "train", transform=tf, download=False, cache="device")
    assert ds.cache is not None and ds.cache.decoded.pixels.data_ptr() == ds.images.data_ptr()  # no copy
    assert all(isinstance(ds[i][0], AugmentParams) for i in range(8))
    params = torch.stack([ds[i][0].values for i in range(8)])
    assert [ds[i][1] for i in range(8)] == ds.targets[:8]
    out = augment_batch(params, torch.zeros(8, dtype=torch.long), [ds.cache], torch.device("cpu"))
    expected = DeviceAugment.from_transform(tf).apply(images[:8], params)
    assert out.dtype == torch.uint8 and out.shape == (8, 3, 32, 32) and torch.equal(out, expected)
    # The eval transform has no device version: items are images, as without a cache.
    ev = CIFAR10(str(tmp_path), "test", transform=eval_transform(32, 1.0), download=False, cache="memory")
    assert torch.equal(ev[3][0], images[3]) and ev[3][1] == 3
    plain = CIFAR10(str(tmp_path), "train", download=False)
    assert plain.cache is None and torch.equal(plain[5][0], images[5])
    with pytest.raises(ConfigError, match="dataset.cache"):
        CIFAR10(str(tmp_path), "train", download=False, cache="gpu")


def test_training_from_torchvision_cifar10_with_a_device_cache(tmp_path, compose_config):
    _fake_cifar10(tmp_path / "data", per_batch=8)
    # The README's command for torchvision's copy, at CPU sizes (cache: device holds on the CPU too).
    cfg = compose_config("experiment=cifar10_vit_tiny", "dataset=cifar10", f"dataset.root={tmp_path / 'data'}",
                   "dataset.download=false", "hardware=cpu", "hardware.batch_size=8", "hardware.num_workers=0",
                   "trainer.epochs=1", "model.arch=test_vit", "model.predictor_dim=64", "model.predictor_heads=2",
                   "model.predictor_depth=1", "monitor.batch_size=16", "logger.progress=false")
    assert cfg.dataset.cache == "device"
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.steps == 5  # 40 images / batch 8
    assert result.random_init_knn_top1 is not None  # scored on the (fake) official test split


# ---- packing the JPEGs for the GPU machine -------------------------------------------------

def test_pack_unpack_is_byte_identical_and_subset_takes_the_first_files(tmp_path):
    src = _jpeg_tree(tmp_path / "src", per_class=3)
    (src / "cat" / ".hidden.jpg").write_bytes(b"x")  # hidden entries are skipped, as ImageFolder does
    info = pack.pack(src, tmp_path / "p.npz")
    assert info["files"] == 30 and info["size"] < info["bytes"] + 10_000
    pack.unpack(tmp_path / "p.npz", tmp_path / "dst")
    for f in src.rglob("*.jpg"):
        if not f.name.startswith("."):
            assert (tmp_path / "dst" / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert not (tmp_path / "dst" / "cat" / ".hidden.jpg").exists()
    assert pack.subset(src, tmp_path / "sub", per_class=2)["files"] == 20
    assert sorted(os.listdir(tmp_path / "sub" / "dog")) == ["0000.jpg", "0001.jpg"]


# ---- the CPU table's rows ------------------------------------------------------------------

def test_cpu_table_row_subtracts_the_monitor_and_shows_the_schedule_a_run_used(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=cifar10_cpu_short\n- seed=1\n- hydra.run.dir=x\n")
    (run / "config.yaml").write_text("seed: 1\noptim:\n  final_lr: 1.0e-06\n")
    runs.write_summary(run, runs.Summary(status="completed", steps=100, global_batch=64, wall_time_s=50.0))
    records = [{"step": 50, "time": 10.0, "loss": 1.0}, {"step": 50, "time": 14.0, "knn/top1": 30.0},
               {"step": 100, "time": 20.0, "loss": 0.5}, {"step": 100, "time": 26.0, "knn/top1": 33.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for protocol, (trained, random_init) in {"knn": (40.04, 28.46), "linear": (45.0, 30.0)}.items():
        runs.eval_result(run, protocol).write_text(json.dumps(
            {"num_train": 45000, "trained": {"top1": trained}, "random_init": {"top1": random_init}}))
    r = cpu_table.row(run, ("optim.final_lr", "seed"))
    assert r["train_wall_s"] == 50.0 - 4.0 - 6.0 and r["views"] == 6400
    assert r["overrides"][-1] == "optim.final_lr=1e-06"  # not set on its command line: from config.yaml
    assert r["overrides"].count("seed=1") == 1  # set there: not repeated
    cells = cpu_table.markdown(r, ("hydra.run.dir",)).split(" | ")
    assert cells[0] == "| `experiment=cifar10_cpu_short` `seed=1` `optim.final_lr=1e-06`"
    assert cells[4:8] == ["40", "40.0", "28.5", "+11.5"]  # the gain of the rounded scores, as printed


# ---- the CPU version of the recipe on real CIFAR-10 JPEGs ----------------------------------

def test_cpu_recipe_trains_on_real_cifar10_and_scores_the_holdout_against_random_init(cifar10_train, tmp_path, compose_config):
    # The README's two commands: 600 JPEGs per class, 200 of them held out, 5 epochs.
    assert pack.subset(cifar10_train, tmp_path / "c10", per_class=600)["files"] == 6000
    result = train(compose_config("experiment=cifar10_cpu", f"dataset.root={tmp_path / 'c10'}"), tmp_path / "run")
    assert result.status == "completed" and result.steps == 5 * (4000 // 64)
    [stats] = result.mixture.values()
    assert stats["size"] == 4000  # the 2,000 held-out images are never pretrained on
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(map(math.isfinite, losses)) and sum(losses[-5:]) < 0.85 * sum(losses[:5])
    assert len([r for r in records if "knn/top1" in r]) == 5  # the curve: one kNN check per epoch
    # At this budget kNN stays near random-init (README): what must hold is a real score on the
    # 2,000 held-out images for both encoders, and no collapse.
    assert 15.0 < result.random_init_knn_top1 < 40.0 and 15.0 < result.knn_top1 < 60.0
    assert result.feature_effective_rank > 4.0 and result.collapse_warning is None


@pytest.mark.slow
def test_cpu_short_recipe_beats_random_init_by_a_clear_margin(cifar10_train, tmp_path, compose_config):
    # experiment=cifar10_cpu_short on all 45,000 pretraining JPEGs (~10 minutes of one core);
    # the kNN check at the end (10,000 memory images, the 5,000 held-out queries) against the
    # random-init encoder of the same seed. MARGIN is below every measured seed (README).
    cfg = compose_config("experiment=cifar10_cpu_short", f"dataset.root={cifar10_train}")
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.steps == 4 * (45_000 // 64)
    assert result.knn_top1 - result.random_init_knn_top1 >= SHORT_MARGIN, (result.knn_top1, result.random_init_knn_top1)
    assert result.collapse_warning is None
