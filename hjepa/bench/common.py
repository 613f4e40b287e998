"""What every benchmark subcommand shares: result rows and their output, configs read
without Hydra (the GPU machine has torch and timm only), and timing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from hjepa import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
CONF = Path(CONF_DIR)
# facebookresearch/ijepa on one H100 80GB HBM3, batch 128, 224 px, bf16, I-JEPA masking,
# images on the GPU (../shared/PEER_BENCHMARKS.md, measured 2026-11-27): img/s.
REFERENCE_STEP = {"vit_small_patch16_224": 1844.0, "vit_base_patch16_224": 1219.0}
IJEPA_LEVELS = [{"depth": "last", "stride": 1, "weight": 1.0}]
MATMUL_OPS = {"mm", "addmm", "bmm", "convolution", "convolution_backward", "_convolution"}



def env() -> dict[str, str]:
    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name()})"
    return {"device": dev, "torch": torch.__version__}


def row(what: str, config: str, value: float, unit: str, baseline: Optional[float] = None,
        baseline_of: Optional[str] = None, higher_is_better: bool = True, **extra: Any) -> dict:
    ratio = None
    if baseline:
        ratio = value / baseline if higher_is_better else baseline / value
    return {"what": what, "config": config, "value": value, "unit": unit, "baseline": baseline,
            "baseline_of": baseline_of, "ratio": ratio, **env(), **extra}


def emit(rows: list[dict], as_json: bool, out: Optional[str]) -> None:
    """As each row is measured: append it to `out`, and print it when `as_json` (the table
    comes at the end, from main)."""
    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if as_json:
        for r in rows:
            print(json.dumps(r), flush=True)


def print_table(rows: list[dict]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    head = ["what", "config", "value", "unit", "baseline", "ratio"]
    table = [[fmt(r.get(k)) for k in head] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    extras = [r for r in rows if "tflops_matmul" in r]
    for r in extras:
        frac = r.get("fraction_of_matmul_peak")
        print(f"  {r['config']}: {r['step_ms']:.2f} ms/step, {r['gflop_per_img_matmul']:.2f} GFLOP/img matmul "
              f"(+{r['gflop_per_img_attention']:.2f} attention), {r['tflops_matmul']:.2f} TFLOP/s"
              + (f" = {frac:.1%} of the measured matmul peak" if frac is not None else "")
              + (f", peak memory {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else "")
              + (f", host syncs/step {r['host_syncs_per_step']:g}" if r.get("host_syncs_per_step") is not None else ""))
    for r in rows:
        if r.get("error") or r.get("skipped"):
            print(f"  {r['config']}: {r.get('error') or r.get('skipped')}")
    print(f"device: {env()['device']}, torch {torch.__version__}", flush=True)



def load_yaml_node(group: str, name: str, values: dict[str, Any]) -> dict:
    """conf/<group>/<name>.yaml with its `defaults` merged (base first, then the node) and
    ${key} interpolations taken from `values`: what Hydra composes for that group."""
    import yaml

    node = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    merged: dict = {}
    for entry in node.pop("defaults", []):
        if isinstance(entry, dict):  # a nested group, e.g. {levels: hjepa3} -> conf/model/levels/hjepa3.yaml
            (sub, option), = entry.items()
            merged.update(load_yaml_node(f"{group}/{sub.removeprefix('override ')}", option, values))
        elif entry != "_self_":
            merged.update(load_yaml_node(group, entry, values))
    merged.update(node)

    def resolve(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("${") and v.endswith("}"):
            return values[v[2:-1]]
        if isinstance(v, list):
            return [resolve(x) for x in v]
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        return v

    return {k: resolve(v) for k, v in merged.items()}


def model_kwargs(name: str, img: int, patch: int, levels: str, arch: Optional[str] = None,
                 predictor: Optional[tuple[int, int, int]] = None) -> dict:
    """HJEPA constructor arguments of conf/model/<name>.yaml; levels "ijepa" replaces the
    levels by I-JEPA's single one (= conf/model/ijepa_vit_small.yaml), "config" keeps them."""
    node = load_yaml_node("model", name, {"image_size": img, "patch_size": patch})
    if node.pop("_target_") != "hjepa.models.hjepa.HJEPA":
        raise SystemExit(f"conf/model/{name}.yaml does not build hjepa.models.hjepa.HJEPA")
    if levels == "ijepa":
        node["levels"] = IJEPA_LEVELS
    if arch:
        node["arch"] = arch
    if predictor:
        node["predictor_dim"], node["predictor_depth"], node["predictor_heads"] = predictor
    return node


def mask_kwargs() -> dict:
    node = load_yaml_node("mask", "multiblock", {})
    node.pop("_target_")
    return node


def optim_kwargs() -> dict:
    node = load_yaml_node("optim", "adamw", {})
    node.pop("_target_")
    return node



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[int], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per call of fn(i), each timed alone (CUDA events on a GPU), after warm-up."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            fn(warmup + i)
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for i in range(steps):
            t = time.perf_counter()
            fn(warmup + i)
            times.append(time.perf_counter() - t)
    return times
