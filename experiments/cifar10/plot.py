"""Training curves of one or more runs from their metrics.jsonl: loss against epochs (per level
dotted when there are several) and the monitor's kNN top-1 on the held-out images.

    python experiments/cifar10/plot.py outputs/<run>/metrics.jsonl [more ...] -o experiments/cifar10/curves.png
    python experiments/cifar10/plot.py main=runs/a/metrics.jsonl ijepa=runs/b/metrics.jsonl -o curves.png
    python experiments/cifar10/plot.py --x views a=... b=... -o curves_cpu.png   # x: image views (steps x batch)
    python experiments/cifar10/plot.py --panel "recipes" long=.../metrics.jsonl short=... \
        --panel "ablation" ijepa/s0=... ijepa/s1=... -o curves_cpu.png   # kNN against image views, a panel each

A label=path argument names a curve (default: the run folder's name). The PNG is kept small
(~100 dpi, a few tens of KB) so it can live in the repository.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def read_metrics(path: Path) -> dict[str, list]:
    """{"train": [(epoch, loss, {level: loss})], "knn": [(epoch, top1)], "random": Optional[float]}."""
    train, monitor = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "loss" in r and "epoch" in r:
            levels = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("loss/")}
            train.append((r["step"], r["epoch"], r["loss"], levels))
        if "knn/top1" in r:
            monitor.append((r["step"], r["knn/top1"]))
    # Monitor records carry the step only: convert with the training records' epochs per step.
    per_step = train[-1][1] / train[-1][0] if train else 0.0
    summary = Path(path).with_name("summary.json")
    s = json.loads(summary.read_text()) if summary.exists() else {}
    knn = [(step * per_step, top1) for step, top1 in monitor]
    if s.get("knn_top1") is not None and train and (not knn or knn[-1][0] < train[-1][1] - 1e-9):
        knn.append((train[-1][1], s["knn_top1"]))  # the end-of-run monitor result (summary only)
    return {"train": [(e, loss, lv) for _, e, loss, lv in train], "knn": knn, "random": s.get("random_init_knn_top1"),
            "views_per_epoch": (train[-1][0] / train[-1][1]) * s.get("global_batch", 0) if train else 0.0}


def plot_runs(runs: dict[str, Path], out: Path, title: Optional[str] = None, x: str = "epoch") -> Path:
    """x: "epoch", or "views" (image views = optimizer steps x global batch, from summary.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, path) in enumerate(runs.items()):
        m = read_metrics(path)
        c = colors[i % len(colors)]
        scale = m["views_per_epoch"] if x == "views" else 1.0
        if m["train"]:
            epochs = [e * scale for e, _, _ in m["train"]]
            ax_loss.plot(epochs, [loss for _, loss, _ in m["train"]], color=c, lw=1.2, label=label)
            names = sorted(m["train"][0][2])
            if len(names) > 1:
                for name in names:
                    ax_loss.plot(epochs, [lv.get(name) for _, _, lv in m["train"]], color=c, lw=0.7, ls=":")
        if m["knn"]:
            ax_knn.plot([e * scale for e, _ in m["knn"]], [t for _, t in m["knn"]], "o-", color=c, ms=3, lw=1.2,
                        label=label)
        if m["random"] is not None:
            ax_knn.axhline(m["random"], color=c, lw=0.8, ls="--")
    xlabel = "image views" if x == "views" else "epoch"
    ax_loss.set(xlabel=xlabel, ylabel="loss (dotted: per level)", yscale="log", title="training loss")
    ax_knn.set(xlabel=xlabel, ylabel="kNN top-1 % (held out)", title="kNN (dashed: random init)")
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, title)


def plot_knn_panels(panels: dict[str, dict[str, Path]], out: Path, title: Optional[str] = None) -> Path:
    """One panel per group: the monitor's kNN top-1 against image views for each run, its
    random-init score dashed in the same colour. Labels "setting/seed" share the setting's
    colour (seeds after the first drawn dash-dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=100, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, runs) in zip(axes[0], panels.items()):
        settings: dict[str, int] = {}
        for label, path in runs.items():
            setting = label.split("/", 1)[0]
            first = setting not in settings
            c = colors[settings.setdefault(setting, len(settings)) % len(colors)]
            m = read_metrics(path)
            views = [e * m["views_per_epoch"] / 1e6 for e, _ in m["knn"]]
            ax.plot(views, [t for _, t in m["knn"]], "o-" if first else "s-.", color=c, ms=2.5, lw=1.1, label=label)
            if m["random"] is not None:
                ax.axhline(m["random"], color=c, lw=0.7, ls="--")
        ax.set(xlabel="image views (millions)", ylabel="kNN top-1 % (10k memory, 5k held out)", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out, title)


def _save(fig, out: Path, title: Optional[str]) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _runs(items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        label, path = item.split("=", 1) if "=" in item and not Path(item).exists() else ("", item)
        runs[label or Path(path).parent.name] = Path(path)
    return runs


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="*", help="metrics.jsonl files, optionally as label=path")
    p.add_argument("--panel", nargs="+", action="append", default=[], metavar=("TITLE", "LABEL=PATH"),
                   help="kNN against image views only, one panel per --panel (then no positional metrics)")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--title", default=None)
    p.add_argument("--x", choices=["epoch", "views"], default="epoch", help="the x axis")
    a = p.parse_args(argv)
    if a.panel:
        out = plot_knn_panels({panel[0]: _runs(panel[1:]) for panel in a.panel}, a.out, a.title)
    elif a.metrics:
        out = plot_runs(_runs(a.metrics), a.out, a.title, a.x)
    else:
        p.error("give metrics.jsonl files or --panel groups")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
