"""`python -m hjepa.train` with no arguments, exactly as the README's quick start runs it
(only the run directory is set): it trains for real on the synthetic data, and the trained
target encoder must beat the same encoder at its random initialisation on held-out images,
with the kNN the run itself prints and with `python -m hjepa.evaluate`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hjepa.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default") / "run"
    proc = subprocess.run([sys.executable, "-m", "hjepa.train", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_default_run_trains_and_beats_random_init(default_run):
    run_dir, stdout = default_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    printed = re.search(r"trained ([\d.]+)%\s+vs\s+random init ([\d.]+)%", stdout)
    assert printed, stdout
    trained, random_init = map(float, printed.groups())
    assert (trained, random_init) == (round(summary["knn_top1"], 1), round(summary["random_init_knn_top1"], 1))
    assert trained > random_init + 2.0, f"trained {trained}% vs random init {random_init}%"
    for name in ("checkpoints/last.pt", "metrics.jsonl", "config.yaml"):
        assert str(run_dir / name) in stdout  # the run says where its outputs are
    log = (run_dir / "train.log").read_text()  # what it printed, kept beside its outputs
    assert printed.group(0) in log and f"checkpoint: {run_dir / 'checkpoints/last.pt'}" in log


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_evaluate_on_the_default_run_gains_over_random_init(default_run, protocol, compose_config):
    run_dir, _ = default_run
    result = evaluate(compose_config(f"run={run_dir}", f"eval={protocol}", "hardware=cpu", name="evaluate"))
    assert result["eval_split"] == "val" and result["num_eval"] == 2048
    assert result["gain_top1"] > 0, result
