"""Evaluation for real: kNN and probes on features of known structure, the evaluate app on a
tiny run trained here, online monitoring, collapse signals and the clear errors."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hjepa.config import build
from hjepa.data.synthetic import SyntheticShapes
from hjepa.data.transforms import eval_transform
from hjepa.errors import CheckpointError, ConfigError
from hjepa.eval.attentive import AttentiveProbe
from hjepa.eval.collapse import collapse_stats, collapse_warning
from hjepa.eval.features import encode
from hjepa.eval.knn import KNN, knn_accuracy
from hjepa.eval.linear import LinearProbe
from hjepa.eval.monitor import Monitor
from hjepa.eval.splits import labeled_splits, stratified_split
from hjepa.evaluate import _validate, evaluate
from hjepa.models.hjepa import HJEPA
from hjepa.train import train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
@pytest.fixture(scope="session")
def run_evaluate(compose_config):
    """run_evaluate(run_dir, *overrides): python -m hjepa.evaluate on one CPU thread."""
    return lambda run_dir, *overrides: evaluate(compose_config(
        f"run={run_dir}", "hardware=cpu", "hardware.num_workers=0", "hardware.threads=1", *overrides, name="evaluate"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny):
    """A tiny real run: 2 epochs of test_vit on 512 synthetic images, monitored every epoch.
    Its collapse_rank is one no 64-wide feature can reach, so the warning path runs too;
    what the run printed is kept in <run dir>/stdout.txt."""
    path = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train(tiny("dataset.num_train=512", "dataset.num_val=128", "hardware.batch_size=64",
                            "monitor.every_epochs=1", "monitor.at_end=true", "monitor.collapse_rank=65"), path, "synthetic")
    (path / "stdout.txt").write_text(out.getvalue())
    assert result.status == "completed"
    return path


def clusters(n, num_classes, dim, noise, seed):
    """Features = a fixed random centre per class + Gaussian noise; labels balanced."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % num_classes
    return centres[y] + noise * torch.randn(n, dim, generator=g), y


# --- kNN -------------------------------------------------------------------------------

def test_knn_on_one_hot_label_features_is_perfect():
    y = torch.arange(500) % 10
    x = F.one_hot(y, 10).float()
    acc = knn_accuracy(x, y, x[:200], y[:200], num_classes=10)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_knn_with_shuffled_labels_is_near_chance():
    y = torch.arange(2000) % 10
    x = F.one_hot(y, 10).float() + 0.01 * torch.randn(2000, 10, generator=torch.Generator().manual_seed(0))
    shuffled = y[torch.randperm(2000, generator=torch.Generator().manual_seed(1))]
    acc = knn_accuracy(x[:1000], shuffled[:1000], x[1000:], y[1000:], num_classes=10, k=20)
    assert 4 < acc["top1"] < 16  # chance is 10%


def test_knn_vote_is_weighted_by_similarity_and_k_is_configurable():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])  # one close item of class 0, two far of class 1
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    sharp = knn_accuracy(bank, labels, query, torch.tensor([0]), num_classes=2, k=3, temperature=0.07)
    flat = knn_accuracy(bank, labels, query, torch.tensor([0]), num_classes=2, k=3, temperature=100.0)
    assert sharp["top1"] == 100.0 and flat["top1"] == 0.0  # a flat vote is a majority vote
    assert KNN(k=200).settings() == {"k": 200, "temperature": 0.07}


# --- linear and attentive probes --------------------------------------------------------

def test_linear_probe_is_near_perfect_on_separable_features():
    train_set, test_set = clusters(600, 5, 32, 0.3, seed=0), clusters(300, 5, 32, 0.3, seed=1)
    result = LinearProbe(epochs=30, lrs=[1e-3, 1e-2])(train_set, test_set, 5, CPU)
    assert result["top1"] > 95 and result["lr"] in (1e-3, 1e-2) and set(result["val_top1"]) == {"0.001", "0.01"}


def test_linear_probe_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    noise = lambda n: (torch.randn(n, 32, generator=g), torch.randint(0, 5, (n,), generator=g))  # noqa: E731
    result = LinearProbe(epochs=30, lrs=[1e-3, 1e-2])(noise(600), noise(1000), 5, CPU)
    assert 14 < result["top1"] < 26  # chance is 20%


def test_attentive_probe_reads_the_informative_token():
    # Class information sits in one token of 16, flagged by feature 0 and at a random position
    # per image; every other token is noise.
    x, y = clusters(600, 4, 32, 0.1, seed=0)
    x[:, 0] = 4.0
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(600, 16, 32, generator=g)
    tokens[torch.arange(600), torch.randint(0, 16, (600,), generator=g)] = x
    train_set, test_set = (tokens[:400].half(), y[:400]), (tokens[400:].half(), y[400:])
    result = AttentiveProbe(lrs=[3e-3], epochs=15, batch_size=64)(train_set, test_set, 4, CPU)
    pooled = lambda s: (s[0].float().mean(1), s[1])  # noqa: E731
    linear = LinearProbe(lrs=[1e-2], epochs=30)(pooled(train_set), pooled(test_set), 4, CPU)
    assert result["top1"] > 95 and result["top1"] > linear["top1"] + 20  # averaging drowns the token


def test_last4_features_are_the_normed_pooled_outputs_of_the_last_blocks():
    torch.manual_seed(0)
    encoder = HJEPA("test_vit", 32, 4, [{"depth": "last", "stride": 1, "weight": 1.0}], 64, 1, 2).target_encoder
    images = torch.randn(2, 3, 32, 32)
    last4, pooled = encode(encoder, images, "last4"), encode(encoder, images, "pooled")
    assert last4.shape == (2, 4 * 64)
    torch.testing.assert_close(last4[:, -64:], pooled)
    torch.testing.assert_close(encode(encoder, images, "tokens").mean(1), pooled)


# --- splits and collapse ----------------------------------------------------------------

def test_stratified_split_holds_out_a_fraction_of_every_class():
    labels = torch.arange(1000) % 10
    kept, held = stratified_split(labels, 0.1, seed=0)
    assert len(held) == 100 and torch.bincount(labels[held]).tolist() == [10] * 10
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == 1000
    assert torch.equal(held, stratified_split(labels, 0.1, seed=0)[1])
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=1)[1])


def test_dataset_without_eval_split_is_scored_on_a_fixed_held_out_part(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    config = {"_target_": "hjepa.data.folder.ImageFolder", "root": str(tmp_path), "split": "train"}
    splits = labeled_splits({"folder": config}, eval_transform(8, 1.0))
    assert (len(splits.train), len(splits.eval)) == (18, 2) and splits.classes == ["a", "b"]
    assert splits.eval_split.startswith("train[held-out 10%")
    assert sorted(label for _, label in splits.eval) == [0, 1]
    with_val = labeled_splits({"folder": {**config, "holdout": 3}}, eval_transform(8, 1.0))
    assert (len(with_val.train), len(with_val.eval), with_val.eval_split) == (14, 6, "val")


def test_imagenet100_is_scored_on_val_with_labels_0_to_99(tmp_path):
    wnids = sorted((ROOT / "hjepa" / "data" / "imagenet100.txt").read_text().split())
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for wnid in wnids + ["n99999999"]:  # plus a class outside ImageNet-100
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / split / wnid / f"{wnid}_0.JPEG")
    config = {"_target_": "hjepa.data.imagenet.ImageNet", "root": str(tmp_path), "split": "train",
              "subset": "imagenet100"}
    splits = labeled_splits({"imagenet100": config}, eval_transform(8, 1.0))
    assert (splits.train_split, splits.eval_split, len(splits.classes)) == ("train", "val", 100)
    assert splits.eval.targets == list(range(100)) and len(splits.train) == 100


def test_collapse_signals():
    d = 64
    spread = collapse_stats(torch.randn(2000, d, generator=torch.Generator().manual_seed(0)))
    assert spread["std"] == pytest.approx(1 / d**0.5, rel=0.05) and spread["rank"] > 0.9 * d
    collapsed = collapse_stats(torch.ones(2000, d) + 1e-4 * torch.randn(2000, d))
    assert collapsed["std"] < 1e-3 and collapsed["rank"] < 1.1
    assert collapse_warning(spread, d, 0.1, 2.0) is None
    assert "collapsed" in collapse_warning(collapsed, d, 0.1, 2.0)


def test_monitor_warns_when_the_encoder_collapses():
    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, [{"depth": "last", "stride": 1, "weight": 1.0}], 64, 1, 2)
    monitor = Monitor(k=5, batch_size=64)
    tf = eval_transform(32)
    monitor.attach(SyntheticShapes("train", tf, num_train=64), SyntheticShapes("val", tf, num_val=32), CPU)
    healthy = monitor.evaluate(model)
    assert set(healthy) == {"knn/top1", "knn/top5", "features/std", "features/effective_rank"}
    assert monitor.warning(healthy) is None
    with torch.no_grad():  # every image -> the final norm's bias: a fully collapsed encoder
        model.target_encoder.norm.weight.zero_()
        model.target_encoder.norm.bias.normal_()
    collapsed = monitor.evaluate(model)
    assert collapsed["features/std"] < 1e-6 and "collapsed" in monitor.warning(collapsed)


# --- the evaluate app on a real run -----------------------------------------------------

@pytest.mark.parametrize("protocol", ["knn", "linear", "attentive"])
def test_evaluate_config_composes_and_is_checked(protocol, run_evaluate, compose_config):
    cfg = _validate(compose_config("run=somewhere", f"eval={protocol}", "dataset=imagenet100", name="evaluate"))
    assert build(cfg.eval).name == protocol and cfg.dataset.subset == "imagenet100"
    with pytest.raises(ConfigError, match=r"eval\.momentum: unknown key"):
        _validate(compose_config("run=somewhere", f"eval={protocol}", "+eval.momentum=0.9", name="evaluate"))
    with pytest.raises(ConfigError, match="run=<run dir> is required"):
        run_evaluate("???")


def test_training_logs_knn_and_collapse_signals_every_epoch_and_warns(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    monitored = [r for r in records if "knn/top1" in r]
    assert len(monitored) == 2  # every_epochs=1, 2 epochs
    for r in monitored:
        assert 0 <= r["knn/top1"] <= 100 and r["features/std"] > 0 and r["features/effective_rank"] >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"knn_top1", "random_init_knn_top1", "feature_std", "feature_effective_rank"} <= set(summary)
    log = (run_dir / "stdout.txt").read_text()
    assert log.count("look collapsed") == 3  # after epochs 1 and 2, and at the end
    assert "epoch 1: WARNING: the target encoder's features look collapsed" in log
    assert summary["collapse_warning"].startswith("WARNING")


def test_evaluate_knn_writes_json_with_random_init_baseline_and_caches(run_dir, capsys, run_evaluate):
    result = run_evaluate(run_dir, "eval=knn")
    saved = json.loads((run_dir / "eval_knn.json").read_text())
    assert saved == result
    assert (saved["dataset"], saved["train_split"], saved["eval_split"]) == ("SyntheticShapes", "train", "val")
    assert (saved["num_train"], saved["num_eval"], saved["num_classes"], saved["image_size"]) == (512, 128, 10, 32)
    assert saved["step"] == 16 and saved["settings"] == {"k": 20, "temperature": 0.07}
    assert saved["gain_top1"] == pytest.approx(saved["trained"]["top1"] - saved["random_init"]["top1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].split()[:2] == ["knn", "SyntheticShapes"]
    # what it extracts, as it does (a progress bar too, on a terminal)
    assert "extracting features: trained encoder, SyntheticShapes train (512 images)" in out
    assert "extracting features: random-init encoder, SyntheticShapes val (128 images)" in out

    cache = run_dir / "eval_cache"
    files = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(files) == 4  # (trained, random init) x (train, eval)
    assert run_evaluate(run_dir, "eval=knn", "eval.k=200")["settings"]["k"] == 200
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # same features: reused
    assert f"features of the trained encoder, SyntheticShapes train (512 images): from {cache}" in capsys.readouterr().out
    run_evaluate(run_dir, "eval=knn", "crop_ratio=1.0")
    assert len(list(cache.iterdir())) == 8  # another transform: new features, old ones untouched


def test_evaluate_linear_end_to_end(run_dir, run_evaluate):
    result = run_evaluate(run_dir, "eval=linear", "eval.epochs=20")
    saved = json.loads((run_dir / "eval_linear.json").read_text())
    assert saved["protocol"] == "linear" and saved["trained"]["lr"] in saved["settings"]["lrs"]
    assert 0 <= result["trained"]["top1"] <= 100 and 0 <= result["random_init"]["top1"] <= 100
    assert (saved["num_train"], saved["num_eval"]) == (512, 128)


def test_evaluate_attentive_caps_its_token_cache(run_dir, run_evaluate):
    # test_vit: 64 tokens x 64 dims x 2 bytes = 8 kB per image; 2 MB hold 256 of the 512.
    result = run_evaluate(run_dir, "eval=attentive", "eval.epochs=2", "eval.lrs=[1e-3]",
                          "eval.max_cache_gb=0.001953125")
    assert result["num_train"] == 256 and result["num_eval"] == 128
    assert (run_dir / "eval_attentive.json").is_file()


def test_evaluate_on_another_dataset_uses_the_models_resolution(run_dir, run_evaluate):
    # Rendered at 48 px, fed at the run's 32 px (timm refuses any other input size).
    result = run_evaluate(run_dir, "eval=knn", "dataset=synthetic", "dataset.image_size=48",
                          "dataset.num_train=100", "dataset.num_val=50", "dataset.seed=1")
    assert (result["image_size"], result["num_train"], result["num_eval"]) == (32, 100, 50)


def test_evaluate_without_a_checkpoint_is_a_clear_error(run_dir, tmp_path, run_evaluate):
    shutil.copy(run_dir / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(CheckpointError, match="no checkpoint: .*checkpoints/last.pt does not exist"):
        run_evaluate(tmp_path)
    with pytest.raises(ConfigError, match="has no config.yaml"):
        run_evaluate(run_dir / "checkpoints")


def test_evaluate_refuses_a_checkpoint_of_another_shape(run_dir, tmp_path, run_evaluate):
    config = (run_dir / "config.yaml").read_text()
    assert "  patch_size: 4\n" in config
    (tmp_path / "config.yaml").write_text(config.replace("  patch_size: 4\n", "  patch_size: 8\n"))
    with pytest.raises(CheckpointError, match="different model shape(.|\n)*pos_embed"):
        run_evaluate(tmp_path, f"ckpt={run_dir / 'checkpoints' / 'last.pt'}")


def test_cli_prints_one_error_line_and_exits_1(run_dir, tmp_path):
    shutil.copy(run_dir / "config.yaml", tmp_path / "config.yaml")
    out = subprocess.run([sys.executable, "-m", "hjepa.evaluate", f"run={tmp_path}", "eval=linear"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("error: no checkpoint: ") and "Traceback" not in out.stderr
