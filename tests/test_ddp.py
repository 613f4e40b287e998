"""DDP for real: two processes under torchrun (gloo, CPU) train the tiny model together."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hjepa.engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
# Runs `python -m hjepa.train` on every rank, recording per rank: digests of the online
# parameters (encoder, predictor, heads) and of the target encoder after every optimizer
# step (update_target runs right after optimizer.step), each step's local loss, and every
# sample index the rank's sampler hands out.
DRIVER = textwrap.dedent("""
    import hashlib, json, os, runpy
    from hjepa.data.mixture import MixtureSampler
    from hjepa.models.hjepa import HJEPA

    trace = open(os.path.join(os.environ["TRACE_DIR"], f"rank{os.environ['RANK']}.jsonl"), "w", buffering=1)

    def digest(state, target):
        h = hashlib.sha256()
        for name, value in state.items():
            if name.startswith("target_encoder.") == target:
                h.update(name.encode() + value.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    forward, update, iterate = HJEPA.forward, HJEPA.update_target, MixtureSampler.__iter__

    def traced_forward(self, *args):
        out = forward(self, *args)
        trace.write(json.dumps({"loss": out["loss"].item()}) + "\\n")
        return out

    def traced_update(self, momentum):
        update(self, momentum)
        state = self.state_dict()
        trace.write(json.dumps({"online": digest(state, False), "target": digest(state, True)}) + "\\n")

    def traced_iter(self):
        for key, index in iterate(self):
            trace.write(json.dumps({"epoch": self.epoch, "index": index}) + "\\n")
            yield key, index

    HJEPA.forward, HJEPA.update_target, MixtureSampler.__iter__ = traced_forward, traced_update, traced_iter
    runpy.run_module("hjepa.train", run_name="__main__")  # = python -m hjepa.train
""")


def _digest(state, target):  # the driver's digest, for the checkpoint
    h = hashlib.sha256()
    for name, value in state.items():
        if name.startswith("target_encoder.") == target:
            h.update(name.encode() + value.numpy().tobytes())
    return h.hexdigest()


def _records(path, key):
    return [r for r in map(json.loads, path.read_text().splitlines()) if key in r]


def test_torchrun_two_processes_stay_identical_and_split_the_data(tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    # %f: a run directory name that differs between two processes resolving it, so a
    # second directory would show that a rank > 0 made its own.
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "driver.py"), "experiment=tiny", "trainer.checkpoint_every=3", f"hydra.run.dir={tmp_path}/runs/" + "${now:%H-%M-%S-%f}"],
        cwd=ROOT, env={**os.environ, "TRACE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout

    rank0, rank1 = tmp_path / "rank0.jsonl", tmp_path / "rank1.jsonl"
    steps0, steps1 = _records(rank0, "online"), _records(rank1, "online")
    assert len(steps0) == len(steps1) == 16  # 2 epochs x 256 images / (16 per rank x 2 ranks)
    assert steps0 == steps1  # online parameters and target encoder identical after every step
    assert len({s["online"] for s in steps0}) == 16 and len({s["target"] for s in steps0}) == 16

    for epoch in (0, 1):
        seen0 = [r["index"] for r in _records(rank0, "index") if r["epoch"] == epoch]
        seen1 = [r["index"] for r in _records(rank1, "index") if r["epoch"] == epoch]
        assert len(seen0) == len(seen1) == 128
        assert not set(seen0) & set(seen1) and len(set(seen0) | set(seen1)) == 256

    # One run directory, written by rank 0 only: one checkpoint, one metrics file.
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.jsonl")] == [run_dir.relative_to(tmp_path) / "metrics.jsonl"]
    assert [p.name for p in tmp_path.rglob("*.pt")] == ["last.pt"]
    assert {"config.yaml", "summary.json", "masks.png", ".hydra"} <= {p.name for p in run_dir.iterdir()}
    assert not list(ROOT.glob("summary.json")) and not list(Path.cwd().glob("summary.json"))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 16 and summary["global_batch"] == 32
    # The logged loss is the mean over ranks of each rank's loss at that step.
    local0, local1 = _records(rank0, "loss"), _records(rank1, "loss")
    logged = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert len(logged) == 16
    for mine, theirs, mean in zip(local0, local1, logged):
        assert abs((mine["loss"] + theirs["loss"]) / 2 - mean) < 1e-5
    # The checkpoint holds the very parameters both ranks ended with.
    state = ckpt.load(run_dir / "checkpoints/last.pt")
    assert state["step"] == 16
    assert _digest(state["model"], False) == steps0[-1]["online"]
    assert _digest(state["model"], True) == steps0[-1]["target"]
