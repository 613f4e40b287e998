"""Rows of the CPU table in experiments/cifar10/README.md, read from finished run directories.

    python experiments/cifar10/cpu_table.py outputs/cifar10_cpu/long_s0 outputs/cifar10_cpu/short_s0 ...

For each run: its command-line overrides (.hydra/overrides.yaml), seed, optimizer steps,
image views (steps x global batch), the training wall time, kNN and linear top-1 of the
trained and the random-init target encoder on the held-out images (from eval_knn.json and
eval_linear.json, written by `python -m hjepa.evaluate`) and the gains.

Training wall time excludes the per-epoch kNN monitor: the Trainer's wall time minus, for
each monitor record in metrics.jsonl, the time from the training record before it (the
epoch's last step, logged before the end-of-epoch checkpoint and the monitor) to the monitor
record. The end-of-epoch checkpoints (a few ms at 0.3M parameters) stay in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from hjepa import runs


def monitor_seconds(metrics: Path) -> float:
    """Seconds spent in the per-epoch monitor (see the module docstring)."""
    spent, last_train = 0.0, None
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "knn/top1" in r:
            if last_train is not None:
                spent += r["time"] - last_train
        elif "loss" in r:
            last_train = r["time"]
    return spent


def _eval(run: Path, protocol: str) -> Optional[dict[str, Any]]:
    path = runs.eval_result(run, protocol)
    return json.loads(path.read_text()) if path.exists() else None


def config_value(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def row(run: Path, config_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """config_keys: settings to show as `key=value` (from config.yaml) where the command line
    did not set them, e.g. a default that changed after the run."""
    run = Path(run)
    summary = runs.read_summary(run)
    if summary is None:
        raise SystemExit(f"error: {run} has no readable {runs.SUMMARY}: not a run directory")
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    config = yaml.safe_load((run / runs.CONFIG).read_text())
    given = {o.split("=", 1)[0] for o in overrides}
    overrides = overrides + [f"{k}={config_value(config, k)}" for k in config_keys if k not in given]
    knn, linear = _eval(run, "knn"), _eval(run, "linear")
    wall = summary.wall_time_s
    return {
        "run": str(run), "overrides": overrides, "seed": config["seed"], "status": summary.status,
        "steps": summary.steps, "views": (summary.steps or 0) * (summary.global_batch or 0), "wall_s": wall,
        "train_wall_s": None if wall is None else wall - monitor_seconds(run / runs.METRICS),
        "knn": knn["trained"]["top1"] if knn else None,
        "knn_random": knn["random_init"]["top1"] if knn else None,
        "knn_memory": knn["num_train"] if knn else None,
        "linear": linear["trained"]["top1"] if linear else None,
        "linear_random": linear["random_init"]["top1"] if linear else None,
        "monitor_random_knn": summary.random_init_knn_top1,
    }


def markdown(r: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    def f(x: Optional[float], fmt: str = ".1f") -> str:
        return "not measured" if x is None else format(x, fmt)

    def gain(a: Optional[float], b: Optional[float]) -> str:
        return "not measured" if a is None or b is None else f"{round(a, 1) - round(b, 1):+.1f}"

    shown = [o for o in r["overrides"] if not o.startswith(skip)]
    cells = [" ".join(f"`{o}`" for o in shown) or "(none)", str(r["seed"]), str(r["steps"]), f"{r['views']:,}",
             f(r["train_wall_s"], ".0f"), f(r["knn"]), f(r["knn_random"]), gain(r["knn"], r["knn_random"]),
             f(r["linear"]), f(r["linear_random"]), gain(r["linear"], r["linear_random"])]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| overrides | seed | steps | image views | training wall s | kNN top-1 | random-init kNN | gain | "
          "linear top-1 | random-init linear | gain |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--skip", nargs="*", default=["hydra.run.dir"],
                   help="leave overrides starting with these out of the table")
    p.add_argument("--config-keys", nargs="*", default=[],
                   help="show these settings (from config.yaml) in the overrides column when not given there")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of Markdown")
    a = p.parse_args(argv)
    rows = [row(r, tuple(a.config_keys)) for r in a.runs]
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(HEADER)
    for r in rows:
        print(markdown(r, tuple(a.skip)))


if __name__ == "__main__":
    main()
