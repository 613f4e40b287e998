"""Hydra multirun sweeps over mixture weights and epochs, and `hjepa.report` on them."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hjepa.report import report

ROOT = Path(__file__).resolve().parents[1]
# mixture=synthetic_pair with 2 x 32 images: 4 steps of 16 per epoch.
TINY_PAIR = [
    "experiment=tiny", "mixture=synthetic_pair", *[f"mixture.components.synthetic_{c}.dataset.{k}={n}"
                                                   for c in "ab" for k, n in (("num_train", 32), ("num_val", 16))],
]
# One thread per process: the cores are shared, and oversubscribed threads make tiny
# models many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_2x2_sweep_runs_every_job_in_its_own_dir_and_the_report_lists_them(tmp_path):
    sweep = tmp_path / "sweep"
    run = subprocess.run(
        [sys.executable, "-m", "hjepa.train", "-m", *TINY_PAIR, "mixture.components.synthetic_a.weight=1,3",
         "trainer.epochs=1,2", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    for job, (weight, epochs) in enumerate([(1, 1), (1, 2), (3, 1), (3, 2)]):
        job_dir = sweep / str(job)
        assert (job_dir / "checkpoints/last.pt").is_file() and (job_dir / "metrics.jsonl").is_file()
        summary = json.loads((job_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 4 * epochs
        # Weights are normalised per job (synthetic_b keeps its 0.5) and recorded as trained on.
        mixture = summary["mixture"]
        assert mixture["synthetic_a"]["weight"] == pytest.approx(weight / (weight + 0.5))
        assert mixture["synthetic_b"]["weight"] == pytest.approx(0.5 / (weight + 0.5))
        assert mixture["synthetic_a"]["expected_draws"] == pytest.approx(64 * weight / (weight + 0.5))
        assert OmegaConf.load(job_dir / "config.yaml").mixture.components.synthetic_a.weight == weight

    table = subprocess.run([sys.executable, "-m", "hjepa.report", str(sweep)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    lines = table.splitlines()
    assert lines[0].startswith("| job | mixture.components.synthetic_a.weight | trainer.epochs | status |")
    assert "kNN" not in lines[0]  # no job measured it
    assert len([line for line in lines if "| completed |" in line]) == 4
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert [(r["mixture.components.synthetic_a.weight"], r["trainer.epochs"], r["steps"]) for r in rows] == [
        ("1", "1", "4"), ("1", "2", "8"), ("3", "1", "4"), ("3", "2", "8")]
    for r in rows:
        summary = json.loads((sweep / r["job"] / "summary.json").read_text())
        for key in ("final_loss", "img_per_s", "wall_time_s"):
            assert float(r[key]) == summary[key], key
        draws = [int(r[f"draws/synthetic_{c}"]) for c in "ab"]
        assert sum(draws) == 64 * int(r["trainer.epochs"])  # every draw of the run, by component
    assert lines[0].endswith("| draws |") and "synthetic_a " in lines[2] and "%, synthetic_b " in lines[2]
    assert (sweep / "report.md").read_text().count("| completed |") == 4
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _job(sweep, name, overrides, summary=None, metrics=()):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    (job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_the_report_lists_failed_unfinished_and_never_started_jobs(tmp_path):
    """A sweep of 2 x 3 jobs as Hydra would leave it mid-way on a cluster (job overrides as
    Hydra writes them: 1e-3 becomes 0.001)."""
    sweep = tmp_path
    OmegaConf.save({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                          "params": None},
                              "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
                              "overrides": {"task": ["optim.lr=1e-3,2e-3", "trainer.epochs=1,2,3", "seed=0"]}}},
                   sweep / "multirun.yaml")
    done = {"status": "completed", "steps": 10, "final_loss": 0.5, "img_per_s": 100.0, "wall_time_s": 12.0,
            "knn_top1": 40.0, "random_init_knn_top1": 30.0}
    _job(sweep, "0", ["optim.lr=0.001", "trainer.epochs=1", "seed=0"], done)
    _job(sweep, "1", ["optim.lr=0.001", "trainer.epochs=2", "seed=0"],
         {"status": "failed", "error": "the loss became NaN or infinite between step 4 and step 5"},
         [{"step": 4, "loss": 0.9, "img_per_s": 90.0}])
    _job(sweep, "2", ["optim.lr=0.001", "trainer.epochs=3", "seed=0"], {"status": "running"},
         [{"step": 7, "loss": 0.7, "img_per_s": 80.0}])
    _job(sweep, "3", ["optim.lr=0.002", "trainer.epochs=1", "seed=0"], None, [{"step": 2, "loss": 0.8}])
    _job(sweep, "4", ["optim.lr=0.002", "trainer.epochs=2", "seed=0"],
         {"status": "interrupted", "step": 6, "checkpoint": "x"}, [{"step": 6, "loss": 0.6}])
    # job 5 never started: no directory at all

    table = report(sweep)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert table.splitlines()[0] == ("| job | optim.lr | trainer.epochs | status | steps | final loss | kNN top-1 % "
                                     "| random-init kNN % | img/s | wall time s | error |")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("| 0", "0.001", "1", "completed"), ("| 1", "0.001", "2", "failed"), ("| 2", "0.001", "3", "unfinished"),
        ("| 3", "0.002", "1", "unfinished"), ("| 4", "0.002", "2", "interrupted"), ("| 5", "0.002", "3", "not started")]
    assert rows[0][4:10] == ["10", "0.5000", "40.0", "30.0", "100", "12.0"]
    assert rows[1][4:6] == ["4", "0.9000"] and "NaN" in rows[1][10]  # how far it got, and why it stopped
    assert rows[5][4:10] == [""] * 6
    assert len(list(csv.DictReader(open(sweep / "report.csv")))) == 6
    assert (sweep / "report.png").is_file()
