"""`python -m hjepa.report <sweep dir>`: every job of a multirun sweep in one table.

Reads each job's .hydra/overrides.yaml, summary.json and metrics.jsonl, prints a Markdown
table (swept values, status, steps, final loss, kNN top-1 when measured, img/s, wall time)
and writes report.md, report.csv (plus every job's full overrides and error) and
report.png (kNN top-1 when measured, else the final loss, against the swept values) into
the sweep directory. No job is dropped: a job that failed, was interrupted, is unfinished
(no summary.json, or status "running") or never started (in the sweep's multirun.yaml but
without a directory, e.g. still pending on SLURM) is listed as such.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from hjepa import runs
from hjepa.runs import Summary

METRICS = [  # (key, column title, format)
    ("steps", "steps", "{:d}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("knn_top1", "kNN top-1 %", "{:.1f}"),
    ("random_init_knn_top1", "random-init kNN %", "{:.1f}"),  # the same encoder at its initialisation
    ("img_per_s", "img/s", "{:.0f}"),
    ("wall_time_s", "wall time s", "{:.1f}"),
]


def expected_jobs(sweep_dir: Path) -> Optional[list[list[str]]]:
    """The override list of every job, in job-number order, as Hydra's basic sweeper
    expands the sweep recorded in multirun.yaml; None when that cannot be known."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    hydra = OmegaConf.to_container(OmegaConf.load(path).hydra, resolve=False)
    if not str(hydra["sweeper"].get("_target_")).endswith("BasicSweeper") or hydra["sweep"]["subdir"] != "${hydra.job.num}":
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (hydra["sweeper"].get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *hydra["overrides"]["task"]])
    return BasicSweeper.split_arguments(overrides, None)[0]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and
            any((p / f).exists() for f in (".hydra/overrides.yaml", runs.SUMMARY, runs.METRICS))]
    return sorted(dirs, key=lambda p: _job_order(p.name))


def _job_order(name: str) -> tuple:
    """Job numbers in numeric order (2 before 10), any other directory after them."""
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def _as_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def read_job(job_dir: Path, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """One row: name, overrides, status, metrics (None where absent) and error."""
    row: dict[str, Any] = {"job": job_dir.name, "overrides": overrides or [], "error": ""}
    if not job_dir.is_dir():
        return {**row, "status": "not started", "draws": {}, **{k: None for k, _, _ in METRICS}}
    if (job_dir / ".hydra/overrides.yaml").is_file():
        row["overrides"] = list(OmegaConf.load(job_dir / ".hydra/overrides.yaml"))
    summary = runs.read_summary(job_dir) or Summary(status="running")
    row["status"] = "unfinished" if summary.status == "running" else summary.status
    row["error"] = summary.error or ""
    last, draws = _read_metrics(job_dir / runs.METRICS)
    row["draws"] = draws
    # Unfinished, interrupted and failed jobs show how far they got (their last logged values).
    row["steps"] = _first(summary.steps, last.get("step"))
    row["final_loss"] = _first(summary.final_loss, last.get("loss"))
    row["knn_top1"] = _first(summary.knn_top1, last.get("knn/top1"))
    row["random_init_knn_top1"] = summary.random_init_knn_top1
    row["img_per_s"] = _first(summary.img_per_s, last.get("img_per_s"))
    row["wall_time_s"] = summary.wall_time_s
    return row


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _read_metrics(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The last value of every key in metrics.jsonl (kNN records and loss records differ),
    and the realised draws per mixture component (the sum of its draws/<name> records)."""
    last: dict[str, Any] = {}
    draws: dict[str, int] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line being written right now
                continue
            last.update(record)
            for key, value in record.items():
                if key.startswith("draws/"):
                    draws[key[6:]] = draws.get(key[6:], 0) + int(value)
    return last, draws


def _shares(draws: dict[str, int]) -> str:
    """Realised draws as shares, e.g. "imagenet100 55.6%, stl10 44.4%" (one component: "")."""
    total = sum(draws.values())
    if len(draws) < 2 or not total:
        return ""
    return ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in draws.items())


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    expected = expected_jobs(sweep_dir)
    rows = [read_job(d) for d in _job_dirs(sweep_dir)]
    if expected is not None:
        present = {r["job"] for r in rows}
        rows += [read_job(sweep_dir / str(i), o) for i, o in enumerate(expected) if str(i) not in present]
        rows.sort(key=lambda r: _job_order(r["job"]))
    return rows


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys: dict[str, set] = {}
    for row in rows:
        for k, v in _as_dict(row["overrides"]).items():
            keys.setdefault(k, set()).add(v)
    return [k for k, values in keys.items() if len(values) > 1 or any(k not in _as_dict(r["overrides"]) for r in rows)]


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else spec.format(value)


def markdown(rows: list[dict[str, Any]], keys: list[str]) -> str:
    metrics = [m for m in METRICS if "knn" not in m[0] or any(r[m[0]] is not None for r in rows)]
    note = any(r["error"] for r in rows)
    mixed = any(_shares(r["draws"]) for r in rows)
    head = ["job", *keys, "status", *[title for _, title, _ in metrics], *(["draws"] if mixed else []),
            *(["error"] if note else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = _as_dict(r["overrides"])
        cells = [r["job"], *[values.get(k, "") for k in keys], r["status"],
                 *[_fmt(r[key], spec) for key, _, spec in metrics]]
        if mixed:
            cells.append(_shares(r["draws"]))
        if note:
            cells.append(r["error"].splitlines()[0][:100] if r["error"] else "")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    components = list(dict.fromkeys(name for r in rows for name in r["draws"]))
    writer.writerow(["job", *keys, "status", *[k for k, _, _ in METRICS], *[f"draws/{c}" for c in components],
                     "overrides", "error"])
    for r in rows:
        values = _as_dict(r["overrides"])
        writer.writerow([r["job"], *[values.get(k, "") for k in keys], r["status"],
                         *["" if r[k] is None else r[k] for k, _, _ in METRICS],
                         *[r["draws"].get(c, "") for c in components], " ".join(r["overrides"]), r["error"]])
    return out.getvalue()


def plot(rows: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    """The swept metric against the first swept key, one line per value of the other keys;
    for kNN, each line's random-init baseline dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, title = ("knn_top1", "kNN top-1 (%)") if any(r["knn_top1"] is not None for r in rows) \
        else ("final_loss", "final loss")
    x_key = keys[0] if keys else None
    xs = [_as_dict(r["overrides"]).get(x_key, r["job"]) if x_key else r["job"] for r in rows]
    numeric = all(_is_number(x) for x in xs)
    order = sorted(set(xs), key=float if numeric else str)
    series: dict[str, list[tuple[float, float]]] = {}
    baselines: dict[str, list[tuple[float, float]]] = {}
    for r, x in zip(rows, xs):
        if r[metric] is None:
            continue  # in the table with its status; nothing to plot
        label = ", ".join(f"{k}={_as_dict(r['overrides']).get(k, '')}" for k in keys[1:]) or title
        at = float(x) if numeric else order.index(x)
        series.setdefault(label, []).append((at, r[metric]))
        if metric == "knn_top1" and r["random_init_knn_top1"] is not None:
            baselines.setdefault(label, []).append((at, r["random_init_knn_top1"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        points.sort()
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if label in baselines:
            base = sorted(baselines[label])
            ax.plot([p[0] for p in base], [p[1] for p in base], linestyle="--", color=line.get_color(),
                    label=f"{label}: random init")
    if not numeric:
        ax.set_xticks(range(len(order)), order, rotation=20)
    ax.set_xlabel(x_key or "job")
    ax.set_ylabel(title)
    ax.set_title(f"{title} of {len(rows)} job(s)")
    if len(series) > 1 or keys[1:] or baselines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def report(sweep_dir: Path) -> str:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: no sweep directory at {sweep_dir}")
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"error: no jobs in {sweep_dir} (expected job directories with .hydra/overrides.yaml, "
                         "as `python -m hjepa.train -m ...` writes them)")
    keys = swept_keys(rows)
    table = markdown(rows, keys)
    (sweep_dir / "report.md").write_text(f"# Sweep {sweep_dir}\n\n{table}")
    (sweep_dir / "report.csv").write_text(to_csv(rows, keys))
    plot(rows, keys, sweep_dir / "report.png")
    return table


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hjepa.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    table = report(args.sweep_dir)
    sys.stdout.write(table)
    print(f"\nwritten: {args.sweep_dir / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
