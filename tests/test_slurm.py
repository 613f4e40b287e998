"""Sweeps on a real Slurm cluster through hydra/launcher=slurm (submitit), with preemption.

Needs a running cluster whose jobs can run this checkout's Python: .ci/run starts one
(.ci/slurm-up.sh, root + apt) before the tests and stops it by PID afterwards. Without one
these tests skip with the reason.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hjepa.engine import checkpoint as ckpt


def _no_cluster_reason() -> str:
    if os.environ.get("HJEPA_NO_SLURM"):  # set by .ci/run when it could not start one
        return os.environ["HJEPA_NO_SLURM"]
    if shutil.which("sinfo") is None:
        return "no Slurm client (sinfo) installed: start a cluster with .ci/slurm-up.sh (root, Debian) or run .ci/run"
    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        return "no running Slurm cluster (sinfo failed): start one with .ci/slurm-up.sh or run .ci/run"
    return ""


pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    # Checked when a test runs, not at collection: sinfo takes seconds to fail without a cluster.
    reason = _no_cluster_reason()
    if reason:
        pytest.skip(reason)


# 64 images, global batch 16: 4 steps per epoch. Enough steps that the signal lands mid-run.
TINY = ["experiment=tiny", "dataset.num_train=64", "dataset.num_val=16", "trainer.epochs=20"]
STEPS = 80
# The jobs inherit the environment (sbatch --export=ALL). One thread per process: the cores
# are shared, and oversubscribed threads make tiny models many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{metrics} did not reach step {step}"
        time.sleep(0.2)


@pytest.mark.parametrize("tasks", [1, pytest.param(2, marks=pytest.mark.slow, id="ddp")])
def test_slurm_sweep_where_a_preempted_job_requeues_and_resumes(tmp_path, tasks):
    """Two identical trainings as one 2-job sweep on Slurm (the swept key changes nothing
    they compute); job 1 gets the preemption signal mid-run, checkpoints, requeues itself,
    resumes in its own run directory and must end exactly where the uninterrupted job 0 ends.
    The default, timestamped sweep directory shows that the requeued job finds its own."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hjepa.train", "-m", "hydra/launcher=slurm",
         "hydra.launcher.gpus_per_node=null", f"hydra.launcher.tasks_per_node={tasks}",
         "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=15",  # > 10 min, so that submitit calls a USR2 a preemption
         *TINY, f"hardware.batch_size={16 // tasks}", "trainer.checkpoint_every=100,101"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    array_id = None
    try:
        deadline = time.time() + 240
        while not list((tmp_path / "outputs/multirun").glob("*/*/.submitit/*_1")):
            assert proc.poll() is None and time.time() < deadline, "the sweep was not submitted"
            time.sleep(0.2)
        sweep = next((tmp_path / "outputs/multirun").glob("*/*"))
        job_id = next(sweep.glob(".submitit/*_1")).name
        array_id = job_id.split("_")[0]
        _wait_for_step(sweep / "1/metrics.jsonl", 2, proc)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            if array_id:
                subprocess.run(["scancel", array_id], check=False)
    assert proc.returncode == 0, out[-3000:]
    assert list((tmp_path / "outputs/multirun").glob("*/*")) == [sweep]  # no second sweep directory

    plain, preempted = (json.loads((sweep / f"{j}/summary.json").read_text()) for j in (0, 1))
    assert plain["status"] == preempted["status"] == "completed"
    assert plain["steps"] == preempted["steps"] == STEPS
    assert "resumed_from_step" not in plain and 2 <= preempted["resumed_from_step"] < STEPS
    log = "".join(p.read_text() for p in (sweep / ".submitit" / job_id).glob("*_0_log.out"))
    assert "received SIGUSR2" in log and f"Requeued job {job_id}" in log
    assert f"resumed from {sweep / '1/checkpoints/last.pt'} at step {preempted['resumed_from_step']}" in log
    steps = [json.loads(line)["step"] for line in (sweep / "1/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every step once: nothing lost, nothing redone twice
    # Resume is exact: the preempted job ends with the uninterrupted job's loss and weights.
    assert preempted["final_loss"] == plain["final_loss"]
    a, b = (ckpt.load(sweep / f"{j}/checkpoints/last.pt")["model"] for j in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)

    subprocess.run([sys.executable, "-m", "hjepa.report", str(sweep)], check=True, capture_output=True, timeout=120)
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [(r["job"], r["status"], r["steps"]) for r in rows] == [("0", "completed", "80"), ("1", "completed", "80")]


def test_a_gpu_job_on_a_cpu_only_partition_is_refused_in_one_clear_line(tmp_path):
    """The README's command as is (one GPU per job) on this CPU-only cluster: sbatch refuses
    it, and the command says so, with what to change, instead of a submitit traceback."""
    done = subprocess.run([sys.executable, "-m", "hjepa.train", "-m", "hydra/launcher=slurm", *TINY],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: Slurm refused the jobs: Invalid generic resource" in done.stderr
    assert "hydra.launcher.gpus_per_node=null hydra.launcher.tasks_per_node=1 hardware=cpu" in done.stderr
