"""Faults injected for real into training runs: diverging weights, torn and corrupt files, a
full disk, killed writers, reruns of finished runs, SIGTERM and Ctrl-C. Each leaves a run
directory that says what happened and resumes, and a message without a traceback."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hjepa import runs
from hjepa.engine import checkpoint as ckpt
from hjepa.engine.trainer import Trainer
from hjepa.errors import CheckpointError, NonFiniteLossError
from hjepa.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _finite(state) -> bool:
    """Every floating-point tensor anywhere in a (nested) checkpoint state is finite."""
    if isinstance(state, dict):
        return all(_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_finite(v) for v in state)
    return not (torch.is_tensor(state) and state.is_floating_point()) or bool(torch.isfinite(state).all())


def _train_cli(run_dir, *overrides, **kwargs):
    return subprocess.run([sys.executable, "-m", "hjepa.train", "experiment=tiny", f"hydra.run.dir={run_dir}",
                           *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


# ---- diverging weights --------------------------------------------------------------------

def test_non_finite_weights_after_a_finite_loss_are_never_saved(tmp_path, tiny, monkeypatch):
    """An update can break the weights while the loss it followed was finite (seen with
    optim.lr=10): the checkpoint due at that step must not be written, and the error must
    name the last one, which resumes."""
    import hjepa.engine.trainer as trainer_module

    update, calls = trainer_module.optimizer_update, {"n": 0}

    def corrupting(model, *args):
        update(model, *args)
        calls["n"] += 1
        if calls["n"] == 10:  # the update of step 10, whose loss was finite, breaks one weight
            with torch.no_grad():
                model.encoder.blocks[0].attn.qkv.weight[0, 0] = float("inf")

    monkeypatch.setattr(trainer_module, "optimizer_update", corrupting)
    with pytest.raises(NonFiniteLossError, match=f"step 10.*the last good checkpoint is {runs.last_checkpoint(tmp_path)}"):
        train(tiny(), tmp_path)
    state = ckpt.load(runs.last_checkpoint(tmp_path))
    assert state["step"] == 5 and _finite(state)
    monkeypatch.undo()
    resumed = train(tiny(), tmp_path)
    assert resumed.status == "completed" and resumed.resumed_from_step == 5


def test_a_checkpoint_with_non_finite_values_is_refused(tmp_path, tiny):
    train(tiny("trainer.epochs=1"), tmp_path)
    state = ckpt.load(runs.last_checkpoint(tmp_path))
    state["model"]["encoder.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    ckpt.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nan.pt'} holds non-finite values"):
        ckpt.load(tmp_path / "nan.pt")


# ---- corrupt checkpoints ------------------------------------------------------------------

def test_a_flipped_bit_in_last_pt_is_detected_and_auto_resume_falls_back_to_the_snapshot(tmp_path, tiny, capsys):
    full = train(tiny("trainer.snapshot_every=1"), tmp_path / "full")  # 2 epochs, snapshots at 1 and 2
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "stop_requested", lambda self, step: step == 24)
        train(tiny("trainer.snapshot_every=1"), tmp_path / "run")
    last = runs.last_checkpoint(tmp_path / "run")
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle of the tensor data
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{last}: (checksum mismatch|not a readable checkpoint)"):
        ckpt.load(last)
    capsys.readouterr()
    resumed = train(tiny("trainer.snapshot_every=1"), tmp_path / "run")
    out = capsys.readouterr().out
    assert f"{last} is corrupt" in out and "epoch_0001.pt" in out
    assert resumed.status == "completed" and resumed.resumed_from_step == 16  # from the end of epoch 1
    a, b = (ckpt.load(runs.last_checkpoint(tmp_path / d))["model"] for d in ("full", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # and lands exactly where the uninterrupted run did
    assert full.steps == resumed.steps == 32


def test_a_corrupt_last_pt_without_snapshots_is_an_error_naming_it(tmp_path, tiny):
    train(tiny("trainer.epochs=1"), tmp_path)
    last = runs.last_checkpoint(tmp_path)
    last.write_bytes(last.read_bytes()[:1000])  # torn
    with pytest.raises(CheckpointError, match=f"(?s){last}: not a readable checkpoint.*no earlier snapshot"):
        train(tiny(), tmp_path)


# ---- temporary files of killed writers ----------------------------------------------------

def test_temporaries_of_a_killed_checkpoint_writer_are_removed_at_start(tmp_path, tiny, capsys):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    writer = textwrap.dedent(f"""
        import torch
        from hjepa.engine import checkpoint as ckpt
        big = torch.randn(32, 1024, 1024)  # 128 MB: a write takes long enough to be killed in
        while True:
            ckpt.save({{"weights": big}}, {str(ckpt_dir / 'epoch_0001.pt')!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], env=ENV)
    deadline = time.time() + 120
    while not list(ckpt_dir.glob(".epoch_0001.pt.tmp-*")) and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    orphans = list(ckpt_dir.glob(".*.tmp-*"))
    assert orphans, "the writer was not killed during a write"
    result = train(tiny("trainer.epochs=1"), tmp_path)
    assert result.status == "completed" and not list(ckpt_dir.glob(".*.tmp-*"))
    assert "removed 1 temporary file" in capsys.readouterr().out


# ---- torn metrics, full disk ----------------------------------------------------------------

def test_a_torn_metrics_line_is_repaired_on_resume(tmp_path, tiny):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "stop_requested", lambda self, step: step == 12)
        train(tiny(), tmp_path)
    with open(tmp_path / runs.METRICS, "a") as f:
        f.write('{"step": 13, "loss": 0.4')  # a kill or a full disk in the middle of a line
    result = train(tiny(), tmp_path)
    assert result.status == "completed"
    records = [json.loads(line) for line in (tmp_path / runs.METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 33))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root only; skips with the reason elsewhere): a tiny run's first
    checkpoint (~5 MB) does not fit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_the_run_with_one_line_and_says_so_in_the_summary(small_disk):
    run_dir = small_disk / "run"
    done = _train_cli(run_dir)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert errors[0].startswith("error: no space left on device") and str(run_dir) in errors[0]
    summary = runs.read_summary(run_dir)
    assert summary.status == "failed" and summary.error.startswith("no space left on device")
    assert not list(run_dir.rglob(".*.tmp-*"))  # no half-written file left


# ---- reruns ---------------------------------------------------------------------------------

def test_rerunning_a_completed_run_keeps_its_results(tmp_path):
    run_dir = tmp_path / "run"
    first = _train_cli(run_dir, "monitor.at_end=true")
    assert first.returncode == 0, first.stderr
    done = json.loads((run_dir / runs.SUMMARY).read_text())
    assert done["status"] == "completed" and "final_loss" in done and "knn_top1" in done

    again = _train_cli(run_dir, "monitor.at_end=true")  # nothing to do: says so, keeps everything
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert json.loads((run_dir / runs.SUMMARY).read_text()) == done

    typo = _train_cli(run_dir, "model.predictor_dim=32")  # a rerun that fails: recorded beside the results
    assert typo.returncode == 1 and "different model shape" in typo.stderr
    after = json.loads((run_dir / runs.SUMMARY).read_text())
    assert {k: after[k] for k in done} == done and "different model shape" in after["rerun_error"]


# ---- SIGTERM and Ctrl-C ---------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_leave_a_resumable_run(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hjepa.train", "experiment=tiny", "trainer.epochs=100",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run_dir / runs.METRICS
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    summary = runs.read_summary(run_dir)
    assert summary.status == "interrupted" and summary.stopped_by == signal.Signals(sig).name
    state = ckpt.load(runs.last_checkpoint(run_dir))
    assert state["step"] == summary.steps >= 3
    assert f"interrupted by {signal.Signals(sig).name} at step {summary.steps}" in out + err
    resumed = _train_cli(run_dir, "trainer.epochs=1")  # shorter now: resumes, finds it done
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {runs.last_checkpoint(run_dir)} at step {summary.steps}" in resumed.stdout
