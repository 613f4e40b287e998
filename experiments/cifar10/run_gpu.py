"""Every GPU row of experiments/cifar10/README.md in one call of at most 10 minutes.

    python experiments/cifar10/run_gpu.py --data-root /tmp/data --out $OUT      # on the H100 (run_gpu.sh)
    python experiments/cifar10/run_gpu.py --tiny --data-root <tiny tree parent> --out /tmp/x   # CPU logic check

1. main: `python -m hjepa.train experiment=cifar10_vit_tiny` (H-JEPA ViT-Tiny/4 on the 45,000
   pretraining images, 5,000 held out), its process wall time and training wall time measured;
   then `python -m hjepa.evaluate eval=knn` and `eval=linear` on the held-out 5,000 (each with
   the random-init baseline of the same shape and seed).
2. ablation at equal budget (same epochs, data, seed and everything else; only model.levels
   differs): I-JEPA, the default 3 levels, and two other level settings, seed 0 for all, then
   seed 1 for all if the time left allows. Runs go in waves of --parallel processes on the one
   GPU (at 32 px the step is bound by per-step overhead, so concurrent processes fill the gaps;
   per-run wall times of a wave are therefore not comparable with the main run's).
   --ablation-epochs auto: the largest epoch count that fits the first seed's wave(s) into the
   time left, computed from the main run's measured img/s assuming NO gain from running
   concurrently; the next seed's waves run when the measured wave time says they fit.
3. results.jsonl (one row per run), results.md (the README table rows), curves.png (loss and
   kNN against epochs, from metrics.jsonl), log.txt, and runs.tar.gz (each run's logs,
   metrics, summary, config and eval json; no checkpoints) under --out: six files at most, as
   the device tool returns at most eight.

Every subprocess has a timeout derived from --deadline-s, so the script ends (and writes what
it has) before the device call's limit. Runs that did not fit are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import plot_runs  # noqa: E402  (experiments/cifar10/plot.py)

IJEPA = [{"depth": "last", "stride": 1, "weight": 1.0}]
# name -> model.levels. ViT-Tiny has 12 blocks: depth 6 is the middle one.
ABLATION = {
    "ijepa": IJEPA,
    "hjepa3": [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": "last", "stride": 2, "weight": 0.5},
               {"depth": "last", "stride": 4, "weight": 0.25}],
    "mid6": [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 6, "stride": 1, "weight": 0.5}],
    "mid6_s2": [{"depth": "last", "stride": 1, "weight": 1.0}, {"depth": 6, "stride": 2, "weight": 0.5}],
}
# The CPU logic check: a 6-block test_vit (depth 3 is its middle), tiny batches, 1 epoch.
TINY = ["model.arch=test_vit", "model.predictor_dim=64", "model.predictor_heads=2", "model.predictor_depth=1",
        "hardware=cpu", "hardware.batch_size=16", "trainer.epochs=2", "hardware.num_workers=0", "dataset.holdout=2",
        "monitor.every_epochs=1", "monitor.max_train_images=null", "monitor.batch_size=64"]
TINY_ABLATION = {name: [dict(level, depth=3) if level["depth"] == 6 else level for level in levels]
                 for name, levels in ABLATION.items()}
TRAIN_IMAGES = 45_000  # per epoch of the real recipe: 50,000 minus the 500-per-class holdout


def levels_override(levels: list[dict]) -> str:
    """model.levels as a Hydra override: model.levels=[{depth:last,stride:1,weight:1.0},...]."""
    items = ",".join("{" + ",".join(f"{k}:{v}" for k, v in level.items()) + "}" for level in levels)
    return f"model.levels=[{items}]"


class Clock:
    def __init__(self, deadline_s: float, log_file: Path):
        self.t0, self.deadline_s, self.log_file = time.perf_counter(), deadline_s, log_file

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"== {self.elapsed():6.1f}s {msg}"
        print(line, flush=True)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    f = open(log, "w")
    f.write(" ".join(cmd) + "\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def finish(procs: list[tuple[subprocess.Popen, float]], timeout: float) -> list[tuple[Optional[int], float]]:
    """Wait for every (process, start time) until `timeout` s from now; kill what is left.
    Returns (return code or None when killed, wall seconds) per process."""
    end = time.perf_counter() + max(timeout, 1.0)
    out = []
    for proc, t0 in procs:
        try:
            rc: Optional[int] = proc.wait(timeout=max(end - time.perf_counter(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        out.append((rc, time.perf_counter() - t0))
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def train_cmd(py: str, run_dir: Path, seed: int, extra: list[str]) -> list[str]:
    return [py, "-m", "hjepa.train", "experiment=cifar10_vit_tiny", f"seed={seed}", f"hydra.run.dir={run_dir}",
            "logger.progress=false", *extra]


def train_row(name: str, group: str, seed: int, run_dir: Path, rc: Optional[int], wall: float,
              levels: Optional[list[dict]], wave_size: int = 1) -> dict[str, Any]:
    s = read_json(run_dir / "summary.json")
    status = s.get("status", "no summary") if rc is not None else "killed (time limit)"
    return {
        "name": name, "group": group, "seed": seed, "levels": levels, "status": status, "rc": rc,
        "epochs": s.get("epochs"), "steps": s.get("steps"), "global_batch": s.get("global_batch"),
        "process_wall_s": round(wall, 1), "train_wall_s": s.get("wall_time_s"), "img_per_s": s.get("img_per_s"),
        "concurrent_runs": wave_size,
        "knn_top1_monitor": s.get("knn_top1"), "random_init_knn_top1_monitor": s.get("random_init_knn_top1"),
        "feature_effective_rank": s.get("feature_effective_rank"), "final_loss": s.get("final_loss"),
        "collapse_warning": s.get("collapse_warning"), "run_dir": str(run_dir),
        "median_img_per_s": median_rate(run_dir / "metrics.jsonl"),
    }


def median_rate(metrics: Path) -> Optional[float]:
    """The median img/s of the logged intervals: the training step rate, without the
    intervals that include an epoch-end kNN check or the first steps' warm-up."""
    try:
        rates = [r["img_per_s"] for r in map(json.loads, metrics.read_text().splitlines()) if "img_per_s" in r]
    except (OSError, ValueError):
        return None
    return round(statistics.median(rates[1:] or rates), 1) if rates else None


def device_name() -> str:
    try:
        import torch
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover - torch is always there in practice
        return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")))
    p.add_argument("--data-root", required=True, help="folder holding cifar10/train/<class>/<jpg>")
    p.add_argument("--runs", type=Path, default=None,
                   help="parent of this call's run directories (default: /tmp/hjepa_cifar10_runs)")
    p.add_argument("--deadline-s", type=float, default=560.0, help="everything ends within this many seconds")
    p.add_argument("--main-timeout-s", type=float, default=330.0, help="the main run's own limit")
    p.add_argument("--ablation-epochs", default="auto", help="int, or auto (see the module docstring)")
    p.add_argument("--ablation-max-epochs", type=int, default=20)
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ablation", nargs="+", default=list(ABLATION), choices=list(ABLATION))
    p.add_argument("--parallel", type=int, default=4, help="ablation runs at once on the one GPU")
    p.add_argument("--skip-main", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU logic check: test_vit, 1 epoch, tiny batches")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every training run")
    a = p.parse_args(argv)

    a.out.mkdir(parents=True, exist_ok=True)
    # A fresh folder per call: trainer.resume=auto would otherwise continue an earlier call's runs.
    runs = (a.runs or Path("/tmp/hjepa_cifar10_runs")) / time.strftime("%Y%m%d-%H%M%S")
    runs.mkdir(parents=True, exist_ok=False)
    clock = Clock(a.deadline_s, a.out / "log.txt")
    env = {**os.environ, "HJEPA_DATA_ROOT": str(Path(a.data_root).resolve()), "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    extra = [*(TINY if a.tiny else []), *a.extra]
    ablation = TINY_ABLATION if a.tiny else ABLATION
    card = device_name()
    rows: list[dict] = []
    results = a.out / "results.jsonl"

    def record(row: dict) -> None:
        row.update(card=card, tiny=a.tiny)
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")

    clock.log(f"card {card}; python {sys.version.split()[0]}; deadline {a.deadline_s:.0f}s; runs in {runs}")

    # ---------------------------------------------------------------- 1. main recipe + probes
    main_rate: Optional[float] = None
    main_overhead = 30.0
    if not a.skip_main:
        run_dir = runs / "main_seed0"
        clock.log("main: experiment=cifar10_vit_tiny seed=0")
        proc = start(train_cmd(py, run_dir, 0, extra), runs / "main_seed0.log", env)
        (rc, wall), = finish([(proc, time.perf_counter())], min(a.main_timeout_s, clock.left() - 30))
        row = train_row("main", "main", 0, run_dir, rc, wall, None)
        clock.log(f"main: {row['status']} in {wall:.1f}s process wall, {row['train_wall_s']} s training, "
                  f"{row['median_img_per_s']} img/s (median), kNN {row['knn_top1_monitor']} vs random {row['random_init_knn_top1_monitor']}")
        if row["status"] == "completed":
            main_rate = row["median_img_per_s"] or row["img_per_s"]
            main_overhead = max(wall - (row["train_wall_s"] or 0.0), 5.0)
            if main_rate and not a.tiny:
                fit = math.floor(280.0 * main_rate / TRAIN_IMAGES)
                row["epochs_fitting_280s_at_this_rate"] = fit
                clock.log(f"main: at {main_rate:.0f} img/s, {fit} epochs fit in 280 s of training")
            for protocol in ("knn", "linear"):
                t0 = time.perf_counter()
                cmd = [py, "-m", "hjepa.evaluate", f"run={run_dir}", f"eval={protocol}", "crop_ratio=1.0",
                       *(["hardware=cpu"] if a.tiny else [])]
                if protocol == "linear" and a.tiny:
                    cmd.append("eval.epochs=5")
                ev = start(cmd, runs / f"main_seed0_eval_{protocol}.log", env)
                (erc, ewall), = finish([(ev, t0)], min(120.0, clock.left() - 20))
                r = read_json(run_dir / f"eval_{protocol}.json")
                row[f"{protocol}_top1"] = r.get("trained", {}).get("top1")
                row[f"{protocol}_random_init_top1"] = r.get("random_init", {}).get("top1")
                row[f"{protocol}_num_train"], row[f"{protocol}_num_eval"] = r.get("num_train"), r.get("num_eval")
                row[f"{protocol}_wall_s"] = round(ewall, 1)
                clock.log(f"main eval={protocol}: rc {erc}, top-1 {row[f'{protocol}_top1']} vs random "
                          f"{row[f'{protocol}_random_init_top1']} ({ewall:.1f}s)")
        record(row)

    # ---------------------------------------------------------------- 2. ablation at equal budget
    waves = [[(name, seed) for name in a.ablation] for seed in a.ablation_seeds]
    waves = [[job for job in wave[i:i + a.parallel]] for wave in waves for i in range(0, len(wave), a.parallel)]
    if a.ablation_epochs == "auto":
        if a.tiny:
            epochs = 1
        else:
            rate = main_rate or 7392.0  # the reference's measured rate when the main run gave none
            first_seed_waves = math.ceil(len(a.ablation) / a.parallel)
            per_wave = (clock.left() - 15.0) / first_seed_waves - main_overhead * 1.5  # processes start at once
            epochs = math.floor(per_wave * rate / (min(a.parallel, len(a.ablation)) * TRAIN_IMAGES))
            epochs = max(1, min(epochs, a.ablation_max_epochs))
    else:
        epochs = int(a.ablation_epochs)
    clock.log(f"ablation: {len(waves)} wave(s) of <= {a.parallel}, {epochs} epoch(s) each, "
              f"settings {', '.join(a.ablation)}, seeds {a.ablation_seeds}")
    wave_time: Optional[float] = None
    for wave in waves:
        if wave_time is not None and wave_time > clock.left() - 10:
            for name, seed in wave:
                record({"name": name, "group": "ablation", "seed": seed, "levels": ablation[name],
                        "status": "skipped (time)", "epochs": epochs})
            clock.log(f"ablation: skipped {wave} (last wave took {wave_time:.0f}s, {clock.left():.0f}s left)")
            continue
        t_wave = time.perf_counter()
        procs, dirs = [], []
        for name, seed in wave:
            run_dir = runs / f"ablation_{name}_seed{seed}"
            over = [levels_override(ablation[name]), f"trainer.epochs={epochs}", "monitor.every_epochs=0",
                    *(["hardware.num_workers=3"] if not a.tiny else [])]
            procs.append((start(train_cmd(py, run_dir, seed, [*extra, *over]), runs / f"ablation_{name}_seed{seed}.log",
                                env), time.perf_counter()))
            dirs.append(run_dir)
        done = finish(procs, clock.left() - 10)
        wave_time = time.perf_counter() - t_wave
        for (name, seed), run_dir, (rc, wall) in zip(wave, dirs, done):
            row = train_row(name, "ablation", seed, run_dir, rc, wall, ablation[name], len(wave))
            record(row)
            clock.log(f"ablation {name} seed {seed}: {row['status']}, kNN {row['knn_top1_monitor']} vs random "
                      f"{row['random_init_knn_top1_monitor']}, {wall:.0f}s")

    # ---------------------------------------------------------------- 3. table + curves
    (a.out / "results.md").write_text(table(rows))
    print(table(rows))
    curves = {r["name"] if r["group"] == "main" else f"{r['name']} s{r['seed']}": Path(r["run_dir"]) / "metrics.jsonl"
              for r in rows if r.get("run_dir") and (Path(r["run_dir"]) / "metrics.jsonl").exists()}
    if curves:
        try:
            plot_runs(curves, a.out / "curves.png", title=f"CIFAR-10, {card}")
        except Exception as e:  # a plot must not lose the numbers
            clock.log(f"plot failed: {type(e).__name__}: {e}")
    bundle(runs, a.out / "runs.tar.gz")
    clock.log("done")
    return 0


def bundle(runs: Path, dest: Path) -> None:
    """Every run's logs, metrics.jsonl, summary.json, config.yaml and eval json in one file
    (the device tool returns at most 8 files); checkpoints stay behind."""
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(runs.rglob("*")):
            if path.is_file() and "checkpoints" not in path.parts and "eval_cache" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(runs.parent)))


def table(rows: list[dict]) -> str:
    def f(v: Any, fmt: str = "{:.1f}") -> str:
        return "not measured" if v is None else fmt.format(v)

    lines = ["| run | levels | seed | epochs | train wall s | process wall s | img/s | concurrent | card | "
             "kNN top-1 (monitor) | kNN top-1 (eval) | linear top-1 | random-init kNN | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        levels = "config" if r.get("levels") is None else levels_override(r["levels"]).split("=", 1)[1]
        lines.append(
            f"| {r['name']} | `{levels}` | {r['seed']} | {r.get('epochs')} | {f(r.get('train_wall_s'))} | "
            f"{f(r.get('process_wall_s'))} | {f(r.get('median_img_per_s'), '{:.0f}')} | {r.get('concurrent_runs', '-')} | "
            f"{r.get('card')} | {f(r.get('knn_top1_monitor'))} | {f(r.get('knn_top1'))} | {f(r.get('linear_top1'))} | "
            f"{f(r.get('knn_random_init_top1', r.get('random_init_knn_top1_monitor')))} | {r['status']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
