"""The training loop, for real: tiny models on the synthetic data, on the CPU."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hjepa.engine import checkpoint as ckpt
from hjepa.engine.optim import Optimization
from hjepa.engine.trainer import Trainer
from hjepa.errors import CheckpointError, DataError, NonFiniteLossError
from hjepa.models.hjepa import HJEPA
from hjepa.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_schedules_hit_start_peak_and_end():
    opt = Optimization(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup=0.1, weight_decay=0.04,
                       final_weight_decay=0.4, ema_momentum=0.996, final_ema_momentum=1.0)
    total = 1000
    assert opt.lr_at(0, total) == pytest.approx(2e-4)
    assert opt.lr_at(100, total) == pytest.approx(1e-3)
    assert max(opt.lr_at(s, total) for s in range(total + 1)) == pytest.approx(1e-3)
    assert opt.lr_at(total, total) == pytest.approx(1e-6)
    assert opt.weight_decay_at(0, total) == pytest.approx(0.04)
    assert opt.weight_decay_at(total, total) == pytest.approx(0.4)
    assert opt.momentum_at(0, total) == pytest.approx(0.996)
    assert opt.momentum_at(500, total) == pytest.approx(0.998)
    assert opt.momentum_at(total, total) == pytest.approx(1.0)
    opt.lr_scaling = "linear"
    opt.set_global_batch(512)
    assert opt.lr_at(100, total) == pytest.approx(2e-3)


def test_no_weight_decay_on_biases_and_norms():
    model = HJEPA("test_vit", 32, 4, [{"depth": "last", "stride": 1, "weight": 1.0}], 64, 1, 2)
    optimizer = Optimization().build(model)
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    Optimization().apply(optimizer, 1000, 1000)
    assert decay["weight_decay"] == pytest.approx(0.4) and no_decay["weight_decay"] == 0.0
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in model.target_encoder.parameters())


@pytest.mark.parametrize("stop_at,workers", [(12, 0), (20, 2)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, stop_at, workers, tiny, losses):
    extra = [f"hardware.num_workers={workers}"]
    full = train(tiny(*extra), tmp_path / "full")
    assert full.status == "completed" and full.steps == 32

    with monkeypatch.context() as m:
        m.setattr(Trainer, "stop_requested", lambda self, step: step == stop_at)
        part = train(tiny(*extra), tmp_path / "split")
    assert part.status == "interrupted" and part.steps == stop_at
    assert ckpt.load(tmp_path / "split/checkpoints/last.pt")["step"] == stop_at
    resumed = train(tiny(*extra), tmp_path / "split")  # trainer.resume=auto
    assert resumed.status == "completed" and resumed.steps == 32

    a = ckpt.load(tmp_path / "full/checkpoints/last.pt")
    b = ckpt.load(tmp_path / "split/checkpoints/last.pt")
    for key in ("model", "optimizer"):
        assert _flat(a[key]).keys() == _flat(b[key]).keys()
        for name, value in _flat(a[key]).items():
            other = _flat(b[key])[name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, name
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert torch.equal(a["model"]["target_encoder.blocks.0.attn.qkv.weight"],
                       b["model"]["target_encoder.blocks.0.attn.qkv.weight"])


def _flat(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix] = tree
    return out


def test_resume_refuses_a_checkpoint_of_another_model_shape(tmp_path, tiny):
    train(tiny("trainer.epochs=1"), tmp_path)
    with pytest.raises(CheckpointError, match="different model shape"):
        train(tiny("trainer.epochs=1", "model.predictor_dim=32"), tmp_path)


def test_resume_never_refuses_to_overwrite_and_explicit_path_resumes(tmp_path, tiny, losses):
    train(tiny("trainer.epochs=1"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="trainer.resume=never"):
        train(tiny("trainer.epochs=1", "trainer.resume=never"), tmp_path / "a")
    result = train(tiny(f"trainer.resume={tmp_path / 'a/checkpoints/last.pt'}"), tmp_path / "b")
    assert result.steps == 32
    assert losses(tmp_path / "b")[0][0] == 17  # continued after step 16, nothing redone


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path, tiny):
    train(tiny("trainer.epochs=1", "trainer.snapshot_every=1"), tmp_path)
    state = ckpt.load(tmp_path / "checkpoints/last.pt")
    assert {"model", "optimizer", "scaler", "step", "sampler", "rng", "config"} <= set(state)
    assert state["sampler"] == {"epoch": 1, "position": 0} and state["step"] == 16
    assert "arch: test_vit" in state["config"]
    assert (tmp_path / "checkpoints/epoch_0001.pt").is_file()
    torch.load(tmp_path / "checkpoints/epoch_0001.pt", weights_only=True)


def test_killing_a_run_while_it_writes_a_checkpoint_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    writer = textwrap.dedent(f"""
        import torch
        from hjepa.engine.checkpoint import FORMAT, save
        big = torch.randn(64, 1024, 1024)  # 256 MB: a write takes long enough to be killed in
        step = 0
        while True:
            step += 1
            save({{"format": FORMAT, "step": step, "weights": big}}, {str(path)!r})
    """)
    for delay in (0.2, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = ckpt.load(path)
        assert state["step"] >= 1 and state["weights"].shape == (64, 1024, 1024)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.tmp") for name in leftovers)  # never under the real name


def test_a_torn_checkpoint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        ckpt.load(path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny):
    forward = HJEPA.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        out = forward(self, *args)
        calls["n"] += 1
        if calls["n"] == 13:  # inject one NaN loss at step 13
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(HJEPA, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="between step 12 and step 13.*checkpoints/last.pt"):
        train(tiny(), tmp_path)
    state = ckpt.load(tmp_path / "checkpoints/last.pt")
    assert state["step"] == 10  # checkpoint_every=5: step 10 is the last one written
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "running"  # never "completed"


def test_cli_reports_a_non_finite_loss_without_a_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "hjepa.train", "experiment=tiny", "optim.lr=1e30", "optim.start_lr=1e30",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode != 0
    assert "error: the loss became NaN or infinite" in run.stderr
    assert "Traceback" not in run.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaN" in summary["error"]


def test_grad_accumulation_equals_one_big_batch():
    """The trainer's rule, loss / grad_accum per micro-batch, sums to the big batch's gradient."""
    from hjepa.masks import MultiBlockMaskCollator

    torch.manual_seed(0)
    model = HJEPA("test_vit", 32, 4, [{"depth": "last", "stride": 1, "weight": 1.0},
                                      {"depth": 3, "stride": 2, "weight": 0.5}], 64, 1, 2)
    images = torch.randn(16, 3, 32, 32)
    context, targets = MultiBlockMaskCollator((8, 8), min_keep=4).sample(16, torch.Generator().manual_seed(0))
    model(images, context, targets)["loss"].backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for half in (slice(0, 8), slice(8, 16)):
        (model(images[half], context[half], targets[half])["loss"] / 2).backward()
    for name, grad in big.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_grad_accumulation_counts_optimizer_steps(tmp_path, tiny):
    result = train(tiny("trainer.epochs=1", "hardware.batch_size=8", "trainer.grad_accum=2"), tmp_path)
    assert result.steps == 16 and result.global_batch == 16
    assert ckpt.load(tmp_path / "checkpoints/last.pt")["sampler"] == {"epoch": 1, "position": 0}


def test_wandb_runs_offline_without_an_account(tmp_path, monkeypatch, tiny, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no cached login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    result = train(tiny("logger=wandb", "trainer.epochs=1"), tmp_path / "run")
    assert result.status == "completed"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert f"W&B is logging offline to {runs[0]}; upload it later with: wandb sync {runs[0]}" in capsys.readouterr().out
    assert (tmp_path / "run" / "masks.png").is_file()


def test_tensorboard_logs_every_metric_and_the_masks_and_resumes_cleanly(tmp_path, monkeypatch, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ["logger=tensorboard", "monitor.every_epochs=1", "monitor.max_train_images=256"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "stop_requested", lambda self, step: step == 12)
        train(tiny(*overrides), tmp_path)
    train(tiny(*overrides), tmp_path)  # resumes at step 12: events after it are purged
    events = EventAccumulator(str(tmp_path)).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"loss", "loss/level0", "loss/level1", "loss/level2", "lr", "weight_decay", "momentum", "img_per_s",
                "epoch", "draws/SyntheticShapes", "knn/top1", "knn/top5", "features/std", "features/effective_rank"}
    assert expected <= scalars, expected - scalars
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 33))
    assert [e.step for e in events.Scalars("knn/top1")] == [16, 32]
    jsonl = [r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(jsonl)
    assert events.Tags()["images"] == ["masks"]


def test_every_missing_dataset_is_named_at_once_with_the_key_that_sets_its_root(tmp_path, compose_config):
    cfg = compose_config("mixture=foundation_mini", f"data_root={tmp_path / 'data'}",
                         "mixture.components.stl10.dataset.download=false",
                         "mixture.components.cifar100.dataset.download=false")
    with pytest.raises(DataError) as e:
        train(cfg, tmp_path / "run")
    message = str(e.value)
    assert message.startswith("3 of the 3 mixture components cannot be read")
    for name, what in (("imagenet100", "ImageNet root"), ("stl10", "STL-10 not found"),
                       ("cifar100", "CIFAR-100 not found")):
        assert f"{name}: {what}" in message and f"set mixture.components.{name}.dataset.root=<folder>" in message
    assert "data_root=<the folder holding your datasets>" in message and "python -m hjepa.data.verify" in message
    with pytest.raises(DataError, match=r"(?s)the dataset cannot be read.*set dataset\.root=<folder>"):
        train(compose_config("dataset=imagenet100", f"data_root={tmp_path / 'data'}"), tmp_path / "run2")
