"""The GPU slot's one run: every GPU row of the project, most valuable first, in one call.

    bash experiments/gpu/run.sh                     # on the GPU machine (run.sh unpacks .gpu/ and calls this)
    bash experiments/gpu/run.sh --cpu-smoke --data <dir> --out <dir>   # the same stages at tiny sizes on a CPU

Stages, in order of value, each with its own time budget; a stage (or a part of one) that no
longer fits in what is left of --deadline-s is recorded as skipped, with the reason:

1. cuda_tier  the CUDA test tier, `pytest -m cuda tests/test_cuda.py` (<= 90 s).
2. cifar10    the CIFAR-10 GPU recipe `experiment=cifar10_vit_tiny` on the 45,000 pretraining
              JPEGs: a 1-epoch probe measures img/s, then the main run gets the most epochs
              that fit in <= 240 s of training (less when stages 3-4 would not fit otherwise),
              then kNN (k=20, cosine, T=0.07, all 45,000 as memory) on the 5,000 held-out
              images for the trained and the random-init encoder (the monitor at the end).
3. step       the training step, eager, bf16, batch 128, 224 px, ViT-S/16 then ViT-B/16, I-JEPA
              levels and the default levels (`python -m hjepa.bench step`), each model followed
              by the facebookresearch/ijepa step on the same card (experiments/gpu/ijepa_step.py).
4. loader     the input pipeline on the host's cores (`python -m hjepa.bench loader`): raw JPEGs
              decoded on the CPU, raw JPEGs decoded on the GPU, the prepared format (CPU, GPU).
5. extra      with what is left: the hierarchy ablation (I-JEPA levels vs the default levels,
              CIFAR-10, equal epochs, run side by side), then torch.compile step rows.

Outputs in --out (at most 8 files come back from the device tool): rows.jsonl (every row,
each with its stage), results.md (targets side by side as ratios, then every table),
log.txt, logs.tar.gz (each subprocess's log and the CIFAR-10 runs' metrics/summaries),
curves.png. results.md is also printed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "cifar10"))

IJEPA_LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}]
# The ablation settings (name -> model.levels; None: the model's default levels).
ABLATION = {"ijepa": IJEPA_LEVELS, "default": None}
REFERENCE_CIFAR10 = {"knn_top1": 40.5, "train_s": 215.0, "img_per_s": 7392.0}  # ../shared/PEER_BENCHMARKS.md
TARGETS = {"step_vs_ijepa": 2.0, "step_vs_ijepa_aim": 2.5, "levels": 0.9, "decode_vs_step": 1.0,
           "cifar10_knn": 70.0, "cifar10_s": 300.0}

# --cpu-smoke: the same stages, tiny sizes (a 6-block test_vit, batches of 4..16, 1 epoch).
SMOKE_TRAIN = ["model.arch=test_vit", "model.predictor_dim=64", "model.predictor_heads=2", "model.predictor_depth=1",
               "hardware=cpu", "hardware.batch_size=16", "hardware.num_workers=0", "hardware.threads=1",
               "dataset.holdout=2", "monitor.batch_size=64"]
SMOKE_STEP = ["--arch", "test_vit", "--img", "32", "--patch", "4", "--batch", "4", "--precision", "fp32",
              "--predictor", "32,1,2", "--warmup", "1", "--steps", "1", "--mask-pool", "2"]
SMOKE_LOADER = ["--n", "6", "--copies", "2", "--workers", "1", "--batch", "4", "--batches", "2", "--warmup", "1",
                "--size", "64"]


def levels_override(levels: Optional[list[dict]]) -> list[str]:
    """model.levels as a Hydra override (none for the model's default levels)."""
    if levels is None:
        return []
    items = ",".join("{" + ",".join(f"{k}:{v}" for k, v in level.items()) + "}" for level in levels)
    return [f"model.levels=[{items}]"]


class Run:
    """The clock, the output files and the subprocesses of one call."""

    def __init__(self, a: argparse.Namespace):
        self.a, self.t0 = a, time.perf_counter()
        self.out, self.work = a.out, a.work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.py = sys.executable
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HJEPA_DATA_ROOT": str(a.data),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if a.cpu_smoke:
            self.env["HJEPA_CUDA_TIER_DEVICE"] = "cpu"  # stage 1 checks the tier's logic on the CPU
            self.env["OMP_NUM_THREADS"] = "1"  # tiny ops: one thread each, no spinning thread teams

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.a.deadline_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"== {self.elapsed():6.1f}s {msg}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")

    def record(self, stage: str, row: dict) -> dict:
        row = {"stage": stage, **row}
        self.rows.append(row)
        with open(self.out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def skip(self, stage: str, what: str, reason: str, **extra: Any) -> None:
        self.record(stage, {"what": what, "skipped": reason, **extra})
        self.log(f"{stage}: skipped {what}: {reason}")

    def start(self, cmd: list[str], name: str) -> tuple[subprocess.Popen, float]:
        log = open(self.work / f"{name}.log", "w")
        log.write(" ".join(cmd) + "\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env), time.perf_counter()

    def finish(self, procs: list[tuple[subprocess.Popen, float]], timeout: float) -> list[tuple[Optional[int], float]]:
        """Wait for each process until `timeout` s from now, kill what is left: (rc or None, wall s)."""
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

    def call(self, cmd: list[str], name: str, timeout: float) -> tuple[Optional[int], float]:
        self.log(f"{name}: {' '.join(cmd[1:])} (limit {timeout:.0f}s)")
        (rc, wall), = self.finish([self.start(cmd, name)], timeout)
        self.log(f"{name}: {'killed at its time limit' if rc is None else f'exit {rc}'} after {wall:.1f}s")
        return rc, wall

    def tail(self, name: str, n: int = 400) -> str:
        try:
            return (self.work / f"{name}.log").read_text()[-n:]
        except OSError:
            return ""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    except OSError:
        return []


def median_rate(metrics: Path) -> Optional[float]:
    """The median img/s of a run's logged intervals after the first (warm-up)."""
    rates = [r["img_per_s"] for r in read_rows(metrics) if "img_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else None


# ------------------------------------------------------------------------------------ stages

def stage_cuda_tier(run: Run) -> None:
    """The CUDA tier: one row per test (passed / failed / skipped, with the message)."""
    budget = min(90.0, run.left())
    if budget < 20:
        return run.skip("cuda_tier", "pytest -m cuda", f"{run.left():.0f}s left, the tier needs 20-90s")
    xml = run.work / "cuda_tier.xml"
    cmd = [run.py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-o", "addopts=", "-p",
           "no:cacheprovider", f"--junitxml={xml}"]
    if run.a.cpu_smoke:  # the tier's quick tests, the CPU standing in for the GPU
        cmd += ["-k", "fused"]
    rc, wall = run.call(cmd, "cuda_tier", budget)
    n = 0
    if not xml.exists():  # killed at its limit: the verbose log still says how far it got
        for line in run.tail("cuda_tier", 100_000).splitlines():
            m = re.match(r"tests/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
            if m:
                n += 1
                run.record("cuda_tier", {"what": "cuda test", "config": m[1], "status": m[2].lower(),
                                         "message": "from the log (the tier was stopped at its time limit)"})
    for case in ET.parse(xml).getroot().iter("testcase") if xml.exists() else []:
        n += 1
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "")[:300]
        run.record("cuda_tier", {"what": "cuda test", "config": case.get("name"), "status": status,
                                 "time_s": float(case.get("time") or 0), "message": message})
    if n == 0:
        run.record("cuda_tier", {"what": "cuda test", "config": "pytest -m cuda", "status": "error",
                                 "message": f"no results (exit {rc}): {run.tail('cuda_tier')}"})


def _train_cmd(run: Run, run_dir: Path, extra: list[str]) -> list[str]:
    base = [run.py, "-m", "hjepa.train", "experiment=cifar10_vit_tiny", "seed=0", f"hydra.run.dir={run_dir}",
            "logger.progress=false", f"dataset.root={run.a.data / 'cifar10' / 'train'}"]
    return base + (SMOKE_TRAIN if run.a.cpu_smoke else []) + extra


def _cifar_row(run_dir: Path, rc: Optional[int], wall: float, **extra: Any) -> dict:
    s = read_json(run_dir / "summary.json")
    size = next(iter((s.get("mixture") or {}).values()), {}).get("size")
    return {"what": "CIFAR-10 recipe", "status": s.get("status", "no summary") if rc is not None else "killed",
            "epochs": s.get("epochs"), "steps": s.get("steps"), "train_images": size,
            "train_wall_s": s.get("wall_time_s"), "process_wall_s": round(wall, 1),
            "img_per_s": median_rate(run_dir / "metrics.jsonl"), "knn_top1": s.get("knn_top1"),
            "random_init_knn_top1": s.get("random_init_knn_top1"), "final_loss": s.get("final_loss"),
            "feature_effective_rank": s.get("feature_effective_rank"), "collapse_warning": s.get("collapse_warning"),
            "run_dir": str(run_dir), **extra}


def stage_cifar10(run: Run, state: dict) -> None:
    """Probe, then the main run sized to fit, scored by kNN against random init at the end."""
    reserve = 30.0 if run.a.cpu_smoke else 150.0  # stages 3 and 4 after this one (~100 s and ~40 s)
    if run.left() - reserve < (20 if run.a.cpu_smoke else 120):
        return run.skip("cifar10", "CIFAR-10 recipe", f"{run.left():.0f}s left; needs 120s plus {reserve:.0f}s "
                        "kept for the step and loader stages")
    probe_dir = run.work / "cifar10_probe"
    rc, wall = run.call(_train_cmd(run, probe_dir, ["trainer.epochs=1", "trainer.log_every=10", "monitor.every_epochs=0",
                                                    "monitor.at_end=false"]),
                        "cifar10_probe", min(90.0, run.left() - reserve))
    probe = run.record("cifar10", {**_cifar_row(probe_dir, rc, wall), "what": "CIFAR-10 probe (rate)"})
    rate, images = probe["img_per_s"], probe["train_images"]
    if probe["status"] != "completed" or not rate or not images:
        return run.skip("cifar10", "CIFAR-10 main run", f"the probe did not complete: {run.tail('cifar10_probe')}")
    overhead = max(wall - (probe["train_wall_s"] or 0.0), 5.0)  # start-up: imports, decoding the JPEGs once
    state["cifar10_rate"], state["cifar10_overhead"], state["cifar10_images"] = rate, overhead, images
    end_eval = 10.0 if run.a.cpu_smoke else 30.0  # kNN of both encoders at the end, 45,000 images as memory
    train_s = min(run.a.cifar10_train_s, run.left() - reserve - overhead - end_eval - 10.0)
    checks_s = 0.0 if run.a.cpu_smoke else 15.0  # ~3 kNN checks during training, inside its wall time
    epochs = max(1, min(run.a.cifar10_max_epochs, math.floor((train_s - checks_s) * rate / images)))
    if run.a.cpu_smoke:
        epochs = 1
    checks = max(1, math.ceil(epochs / 3))  # the kNN curve: about three checks during training
    main_dir = run.work / "cifar10_main"
    rc, wall = run.call(_train_cmd(run, main_dir, [f"trainer.epochs={epochs}", f"monitor.every_epochs={checks}",
                                                   "monitor.at_end=true", "monitor.max_train_images=null",
                                                   "monitor.max_eval_images=null"]),
                        "cifar10_main", min(train_s * 1.25 + overhead + end_eval + 30, run.left() - 20))
    row = _cifar_row(main_dir, rc, wall, planned_train_s=round(train_s, 1), probe_img_per_s=rate,
                     baseline=REFERENCE_CIFAR10["knn_top1"],
                     baseline_of=f"facebookresearch/ijepa ViT-Tiny/4: {REFERENCE_CIFAR10['knn_top1']}% kNN top-1 after "
                                 f"{REFERENCE_CIFAR10['train_s']:.0f} s of training on an H100 (PEER_BENCHMARKS.md)")
    row.update(config=f"experiment=cifar10_vit_tiny, {epochs} epochs of {images} images, kNN on the held-out "
                      f"images (all pretraining images as memory)", value=row["knn_top1"], unit="% kNN top-1")
    run.record("cifar10", row)
    state["cifar10_main"] = main_dir
    run.log(f"cifar10: {row['status']}, {epochs} epochs in {row['train_wall_s']} s, kNN {row['knn_top1']} "
            f"vs random init {row['random_init_knn_top1']}")


def stage_step(run: Run) -> None:
    """Our step (both level settings) then the reference's, per model, ViT-S first."""
    ijepa = run.a.ijepa
    pairs = [("hjepa_vit_small", "vit_small"), ("hjepa_vit_base", "vit_base")]
    if run.a.cpu_smoke:
        pairs = pairs[:1]
    stage_end = run.elapsed() + min(run.left(), 170.0)
    for ours, theirs in pairs:
        for what, cmd, name, need in (
            (f"train step {ours}", [run.py, "-m", "hjepa.bench", "step", "--compile", "off", "--models", ours,
                                    "--levels", "both", "--profile", "--json", "--out", str(run.work / "step.jsonl")]
             + (SMOKE_STEP if run.a.cpu_smoke else []), f"step_{ours}", 25.0),
            (f"train step facebookresearch/ijepa {theirs}", [run.py, str(ROOT / "experiments/gpu/ijepa_step.py"),
                                                              "--ijepa", str(ijepa), "--models", theirs,
                                                              "--out", str(run.work / "ijepa.jsonl")]
             + (["--tiny"] if run.a.cpu_smoke else []), f"ijepa_{theirs}", 20.0),
        ):
            left = min(stage_end - run.elapsed(), run.left())
            reference = name.startswith("ijepa_")
            if reference and not (ijepa / "src" / "helper.py").is_file():
                run.skip("step", what, f"no facebookresearch/ijepa checkout at {ijepa} "
                         "(experiments/gpu/prepare.py puts one in .gpu/ijepa)")
                continue
            if left < (5 if run.a.cpu_smoke else need):
                run.skip("step", what, f"{left:.0f}s left in the stage")
                continue
            rows_file = run.work / ("ijepa.jsonl" if reference else "step.jsonl")
            before = len(read_rows(rows_file))
            rc, _ = run.call(cmd, name, left)
            new = read_rows(rows_file)[before:]
            for r in new:
                run.record("step", r)
            if rc != 0:
                run.record("step", {"what": what, "error": f"exit {rc}: {run.tail(name)}"})


def stage_loader(run: Run) -> None:
    left = min(run.left(), 110.0)
    if left < (5 if run.a.cpu_smoke else 30):
        return run.skip("loader", "loader rows", f"{run.left():.0f}s left")
    workers = max(1, min(15, (os.cpu_count() or 2) - 1))
    images = run.a.data / "imagenet-samples"
    cmd = [run.py, "-m", "hjepa.bench", "loader", "--images", str(images), "--json",
           "--out", str(run.work / "loader.jsonl"), "--pipelines", "jpeg_cpu,jpeg_gpu,prepared,prepared_gpu"]
    cmd += SMOKE_LOADER if run.a.cpu_smoke else ["--n", "125", "--copies", "40", "--workers", str(workers)]
    rc, _ = run.call(cmd, "loader", left)
    for r in read_rows(run.work / "loader.jsonl"):
        run.record("loader", r)
    if rc != 0:
        run.record("loader", {"what": "loader rows", "error": f"exit {rc}: {run.tail('loader')}"})


def stage_extra(run: Run, state: dict) -> None:
    """The hierarchy ablation at a short equal budget, then torch.compile rows."""
    rate, overhead, images = (state.get(k) for k in ("cifar10_rate", "cifar10_overhead", "cifar10_images"))
    need = (overhead or 30.0) + (10 if run.a.cpu_smoke else 45)
    if not rate:
        run.skip("extra", "hierarchy ablation", "no CIFAR-10 rate measured (stage 2 did not run)")
    elif run.left() < need + (0 if run.a.cpu_smoke else 20):
        run.skip("extra", "hierarchy ablation", f"{run.left():.0f}s left, needs {need:.0f}s")
    else:
        # Both settings run at once on the one GPU: each gets half the measured rate, at worst.
        train_s = min(120.0, (run.left() - overhead - 30) * 0.6)
        epochs = 1 if run.a.cpu_smoke else max(1, math.floor(train_s * rate / 2 / images))
        procs, dirs = [], {}
        settings = dict(list(ABLATION.items())[:1]) if run.a.cpu_smoke else ABLATION  # smoke: one process
        for name, levels in settings.items():
            d = dirs[name] = run.work / f"ablation_{name}"
            over = levels_override(levels) + [f"trainer.epochs={epochs}", "monitor.every_epochs=0", "monitor.at_end=true",
                                              "monitor.max_train_images=null", "monitor.max_eval_images=null"]
            over += [] if run.a.cpu_smoke else ["hardware.num_workers=6"]
            run.log(f"ablation {name}: {epochs} epochs")
            procs.append(run.start(_train_cmd(run, d, over), f"ablation_{name}"))
        for (name, d), (rc, wall) in zip(dirs.items(), run.finish(procs, min(run.left() - 10, train_s * 2 + overhead + 60))):
            levels = ABLATION[name]
            r = _cifar_row(d, rc, wall, what="hierarchy ablation (CIFAR-10)", levels=levels or "model default",
                           config=f"{'I-JEPA levels' if levels else 'default levels'}, {epochs} epochs, "
                                  f"{len(dirs)} runs side by side",
                           value=None, unit="% kNN top-1")
            r["value"] = r["knn_top1"]
            run.record("extra", r)
            run.log(f"ablation {name}: {r['status']}, kNN {r['knn_top1']} vs random init {r['random_init_knn_top1']}")
    compiled = [("hjepa_vit_small", "ijepa"), ("hjepa_vit_small", "config"), ("hjepa_vit_base", "ijepa"),
                ("hjepa_vit_base", "config")]
    for model, levels in compiled:
        what = f"train step {model} levels={levels} compile=on"
        if run.a.cpu_smoke:
            run.skip("extra", what, "cpu smoke: torch.compile takes minutes on a CPU")
            continue
        if run.left() < 100:
            run.skip("extra", what, f"{run.left():.0f}s left; compiling and timing one row takes ~100s")
            continue
        cmd = [run.py, "-m", "hjepa.bench", "step", "--compile", "on", "--models", model, "--levels", levels,
               "--json", "--out", str(run.work / "compile.jsonl")]
        before = len(read_rows(run.work / "compile.jsonl"))
        rc, _ = run.call(cmd, f"compile_{model}_{levels}", run.left() - 5)
        for r in read_rows(run.work / "compile.jsonl")[before:]:
            run.record("extra", r)
        if rc != 0:
            run.record("extra", {"what": what, "error": f"exit {rc}: {run.tail(f'compile_{model}_{levels}')}"})


# ------------------------------------------------------------------------------------ report

def _ok(r: dict) -> bool:
    return not r.get("error") and not r.get("skipped") and isinstance(r.get("value"), (int, float)) \
        and math.isfinite(r["value"])


def find(rows: list[dict], stage: str, pred: Callable[[dict], bool]) -> Optional[dict]:
    return next((r for r in rows if r.get("stage") == stage and _ok(r) and pred(r)), None)


def verdict(value: Optional[float], target: float, what: str, higher: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher else value <= target
    if met:
        return "met"
    miss = (target - value) / target if higher else (value - target) / target
    return f"missed by {miss:.0%} ({what})"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each measured side by side in this run: ratio, target, verdict."""
    out = []
    for arch, label in (("vit_small", "ViT-S/16"), ("vit_base", "ViT-B/16")):
        ours = find(rows, "step", lambda r: r.get("model") == f"hjepa_{arch}" and r.get("levels") == 1
                    and r.get("what") == "train step")
        default = find(rows, "step", lambda r: r.get("model") == f"hjepa_{arch}" and (r.get("levels") or 0) > 1
                       and r.get("what") == "train step")
        theirs = find(rows, "step", lambda r: r.get("what") == "train step (facebookresearch/ijepa)"
                      and r.get("model") == arch)
        ratio = ours["value"] / theirs["value"] if ours and theirs else None
        need = f"needs {TARGETS['step_vs_ijepa'] * theirs['value'] - ours['value']:,.0f} img/s more" if ratio else ""
        detail = ""
        if ours:
            detail = (f"ours {ours['value']:,.0f} img/s, {ours.get('tflops_matmul', 0):.0f} TFLOP/s"
                      + (f" = {ours['fraction_of_matmul_peak']:.0%} of the measured bf16 matmul rate"
                         if ours.get("fraction_of_matmul_peak") else "")
                      + (f", {ours['host_syncs_per_step']:g} host syncs/step" if ours.get("host_syncs_per_step") is not None else ""))
        if theirs:
            detail += f"; ijepa {theirs['value']:,.0f} img/s, {theirs.get('tflops_matmul', 0):.0f} TFLOP/s"
        if ours and ours.get("profile") and (ratio is None or ratio < TARGETS["step_vs_ijepa"]):
            detail += "; profile, top ops by time: " + ", ".join(f"{op['name']} {op['share']:.0%}"
                                                                for op in ours["profile"][:5])
        out.append({"target": f"{label} step (I-JEPA levels) vs the facebookresearch/ijepa step, same card",
                    "ratio": ratio, "goal": f">= {TARGETS['step_vs_ijepa']}x (aim {TARGETS['step_vs_ijepa_aim']}x)",
                    "verdict": verdict(ratio, TARGETS["step_vs_ijepa"], need), "detail": detail})
        lv = default["value"] / ours["value"] if default and ours else None
        out.append({"target": f"{label} step, default levels vs one level", "ratio": lv,
                    "goal": f">= {TARGETS['levels']} (within 10%)",
                    "verdict": verdict(lv, TARGETS["levels"], "the extra levels cost more than 10%"),
                    "detail": f"{default['value']:,.0f} vs {ours['value']:,.0f} img/s" if lv else ""})
    step_s = find(rows, "step", lambda r: r.get("model") == "hjepa_vit_small" and r.get("levels") == 1
                  and r.get("what") == "train step")
    for pipeline, label in (("jpeg_gpu", "raw JPEGs decoded on the GPU"), ("jpeg_cpu", "raw JPEGs decoded on the CPU"),
                            ("prepared", "prepared format"), ("prepared_gpu", "prepared format decoded on the GPU")):
        loader = find(rows, "loader", lambda r: r.get("pipeline") == pipeline)
        ratio = loader["value"] / step_s["value"] if loader and step_s else None
        out.append({"target": f"input pipeline, {label}, vs the ViT-S/16 step rate (I-JEPA levels)", "ratio": ratio,
                    "goal": ">= 1.0" if pipeline == "jpeg_gpu" else "(for reference)",
                    "verdict": verdict(ratio, TARGETS["decode_vs_step"], "the step would wait for data")
                    if pipeline == "jpeg_gpu" else ("-" if ratio is None else ("feeds the step" if ratio >= 1 else "starves the step")),
                    "detail": f"{loader['value']:,.0f} vs {step_s['value']:,.0f} img/s" if ratio else ""})
    cifar = find(rows, "cifar10", lambda r: r.get("what") == "CIFAR-10 recipe")
    if cifar and cifar.get("train_wall_s"):
        knn, secs = cifar["knn_top1"], cifar["train_wall_s"]
        ref = REFERENCE_CIFAR10
        v = verdict(knn, TARGETS["cifar10_knn"], f"{TARGETS['cifar10_knn'] - knn:.1f} points short")
        if secs > TARGETS["cifar10_s"]:
            v += f"; over 5 minutes by {secs - TARGETS['cifar10_s']:.0f}s"
        out.append({"target": "CIFAR-10 kNN top-1 (held-out 5,000) vs the reference's 40.5% in 215 s",
                    "ratio": knn / ref["knn_top1"], "goal": ">= 70% within 5 minutes of training",
                    "verdict": v, "detail": f"{knn:.1f}% after {secs:.0f}s of training ({cifar.get('epochs')} epochs, "
                                            f"{cifar.get('img_per_s') or 0:,.0f} img/s; random init "
                                            f"{_fmt(cifar.get('random_init_knn_top1'))}%)"})
    else:
        out.append({"target": "CIFAR-10 kNN top-1 (held-out 5,000) vs the reference's 40.5% in 215 s", "ratio": None,
                    "goal": ">= 70% within 5 minutes of training", "verdict": "not measured", "detail": ""})
    return out


def _fmt(v: Any, spec: str = ",.1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def device_description() -> str:
    try:
        import torch

        name = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "no GPU (CPU)"
        return f"{name}, torch {torch.__version__}"
    except Exception as e:  # pragma: no cover - torch is always installed in practice
        return f"torch unavailable ({e})"


def report(run: Run, started: str) -> str:
    rows = run.rows
    lines = [f"# GPU run: {device_description()}, {started}",
             "", f"Command: `bash experiments/gpu/run.sh{' --cpu-smoke' if run.a.cpu_smoke else ''}`; "
             f"host {platform.node()} ({os.cpu_count()} CPU cores); {run.elapsed():.0f}s of a {run.a.deadline_s:.0f}s "
             "deadline.", "", "## Targets (measured side by side in this run)", "",
             "| target | ratio | goal | verdict | measured |", "|---|---|---|---|---|"]
    for t in targets(rows):
        lines.append(f"| {t['target']} | {_fmt(t['ratio'], '.2f')} | {t['goal']} | {t['verdict']} | {t['detail']} |")
    lines += ["", "## Stages", "", "| stage | rows | skipped | errors |", "|---|---|---|---|"]
    for stage in ("cuda_tier", "cifar10", "step", "loader", "extra"):
        rs = [r for r in rows if r["stage"] == stage]
        skipped = "; ".join(f"{r['what']}: {r['skipped']}" for r in rs if r.get("skipped")) or "-"
        errors = sum(1 for r in rs if r.get("error") or r.get("status") in ("failed", "error"))
        lines.append(f"| {stage} | {len(rs)} | {skipped} | {errors} |")
    tier = [r for r in rows if r["stage"] == "cuda_tier" and r.get("what") == "cuda test"]
    if tier:
        lines += ["", "## CUDA tier", "", "| test | status | s | message |", "|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['status']} | {_fmt(r.get('time_s'))} | {r.get('message', '')[:120]} |"
                  for r in tier]
    steps = [r for r in rows if r["stage"] in ("step", "extra") and str(r.get("what", "")).startswith("train step")]
    if steps:
        lines += ["", "## Training step (batch, resolution, precision in the config)", "",
                  "| step | config | img/s | ms/step | GFLOP/img (matmul) | TFLOP/s | of bf16 peak | peak GiB | syncs/step |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r['what']} | {r.get('config', '')} | {_fmt(r.get('value'), ',.0f')} | "
                         f"{_fmt(r.get('step_ms'), '.1f')} | {_fmt(r.get('gflop_per_img_matmul'), '.1f')} | "
                         f"{_fmt(r.get('tflops_matmul'), '.0f')} | {_fmt(r.get('fraction_of_matmul_peak'), '.1%')} | "
                         f"{_fmt(r.get('peak_memory_gib'), '.1f')} | {_fmt(r.get('host_syncs_per_step'), 'g')} |"
                         + (f" {r.get('error') or r.get('skipped')}" if r.get("error") or r.get("skipped") else ""))
    peak = next((r for r in rows if r.get("what") == "matmul peak"), None)
    if peak:
        lines.append(f"\nMeasured matmul rate: {peak['value']:,.0f} TFLOP/s ({peak['config']}).")
    loaders = [r for r in rows if r["stage"] == "loader"]
    if loaders:
        lines += ["", "## Input pipeline", "", "| pipeline | config | img/s | vs CPU decoding |", "|---|---|---|---|"]
        lines += [f"| {r['what']} | {r.get('config', '')} | {_fmt(r.get('value'), ',.0f')} | {_fmt(r.get('ratio'), '.2f')} |"
                  + (f" {r.get('error') or r.get('skipped')}" if r.get("error") or r.get("skipped") else "")
                  for r in loaders]
    cifar = [r for r in rows if "CIFAR-10" in str(r.get("what"))]
    if cifar:
        lines += ["", "## CIFAR-10", "", "| run | levels | status | epochs | train s | img/s | kNN top-1 | random init |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['what']} | {r.get('levels', 'model default') if 'ablation' in r['what'] else 'model default'} | "
                  f"{r.get('status', r.get('skipped', '-'))} | {_fmt(r.get('epochs'))} | {_fmt(r.get('train_wall_s'), '.0f')} | "
                  f"{_fmt(r.get('img_per_s'), ',.0f')} | {_fmt(r.get('knn_top1'))} | {_fmt(r.get('random_init_knn_top1'))} |"
                  for r in cifar]
    return "\n".join(lines) + "\n"


def bundle(run: Run) -> None:
    """Every subprocess log and each CIFAR-10 run's config, metrics and summary, in one file."""
    with tarfile.open(run.out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(run.work.rglob("*")):
            if path.is_file() and "checkpoints" not in path.parts and "eval_cache" not in path.parts \
                    and path.suffix in (".log", ".jsonl", ".json", ".yaml", ".xml", ".txt"):
                tar.add(path, arcname=str(path.relative_to(run.work)))


def curves(run: Run, state: dict) -> None:
    runs = {name: run.work / d / "metrics.jsonl" for name, d in (("main", "cifar10_main"), ("ablation I-JEPA levels",
            "ablation_ijepa"), ("ablation default levels", "ablation_default"))
            if (run.work / d / "metrics.jsonl").exists()}
    if runs:
        try:
            from plot import plot_runs  # experiments/cifar10/plot.py

            plot_runs(runs, run.out / "curves.png", title="CIFAR-10")
        except Exception as e:  # a plot must not lose the numbers
            run.log(f"curves: {type(e).__name__}: {e}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"))
    p.add_argument("--data", type=Path, default=Path("/tmp/hjepa_data"),
                   help="holds cifar10/train/<class>/<jpg> and imagenet-samples/<jpg> (run.sh unpacks them there)")
    p.add_argument("--work", type=Path, default=None, help="run directories and logs (default: a fresh /tmp folder)")
    p.add_argument("--ijepa", type=Path, default=ROOT / ".gpu" / "ijepa", help="checkout of facebookresearch/ijepa")
    p.add_argument("--deadline-s", type=float, default=540.0, help="everything ends within this many seconds")
    p.add_argument("--cifar10-train-s", type=float, default=240.0, help="the main CIFAR-10 run's training budget")
    p.add_argument("--cifar10-max-epochs", type=int, default=300)
    p.add_argument("--stages", default="cuda_tier,cifar10,step,loader,extra")
    p.add_argument("--cpu-smoke", action="store_true", help="the same stages at tiny sizes on the CPU")
    a = p.parse_args(argv)
    a.data = a.data.resolve()
    a.work = (a.work or Path(f"/tmp/hjepa_gpu_run/{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    run = Run(a)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run.log(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, deadline {a.deadline_s:.0f}s, work {a.work}")
    state: dict = {}
    stages = {"cuda_tier": lambda: stage_cuda_tier(run), "cifar10": lambda: stage_cifar10(run, state),
              "step": lambda: stage_step(run), "loader": lambda: stage_loader(run),
              "extra": lambda: stage_extra(run, state)}
    for name in a.stages.split(","):
        t = run.elapsed()
        try:
            stages[name]()
        except Exception as e:  # a broken stage must not lose the others
            run.record(name, {"what": f"stage {name}", "error": f"{type(e).__name__}: {e}"})
        run.log(f"stage {name}: {run.elapsed() - t:.1f}s")
    text = report(run, started)
    (a.out / "results.md").write_text(text)
    curves(run, state)
    bundle(run)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
