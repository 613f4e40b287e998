"""Check that a dataset, or every component of a mixture, is usable before training on it.

    python -m hjepa.data.verify dataset=imagenet100 dataset.root=/data/imagenet
    python -m hjepa.data.verify mixture=foundation_mini +full=true

For every split a run uses (pretraining, labeled and eval split) it prints the classes found
and missing, image counts (total, min and max per class, unlabeled), unreadable files and
the free disk space at the root; absent or misplaced data are reported with how to obtain
or fix them. Files are checked cheaply (empty, or leading bytes of no known image format);
`+full=true` decodes every image. Exit status 0 when usable, 1 otherwise. It writes nothing:
no run directory, no .hydra/ copy, no log file.
"""

from __future__ import annotations

import collections
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hjepa import CONF_DIR
from hjepa.config import build, dataset_configs
from hjepa.data.decode import UnreadableImageError, decode_image, sniff_format
from hjepa.data.folder import FileDataset
from hjepa.errors import HJEPAError

MAX_LISTED = 10
COLUMNS = ("split", "classes", "missing", "images", "per class", "unlabeled", "unreadable")


def verify(cfg: DictConfig, full: bool = False) -> bool:
    """Print the report for every dataset of `cfg`; True when all of them are usable."""
    results = [verify_dataset(name, node, full) for name, node in _dataset_nodes(cfg).items()]
    ok = all(results)
    print("usable" if ok else "NOT usable: see the messages above")
    return ok


def verify_dataset(name: str, node: DictConfig, full: bool = False) -> bool:
    root = node.get("root")
    where = f" at {Path(root).expanduser().resolve()} ({_free_disk(Path(root).expanduser())} free)" if root else ""
    print(f"{name}: {node._target_}{where}")
    try:
        dataset = build(node)
    except HJEPAError as e:
        print(f"  {node.get('split', '')}: {e}")
        return False
    splits = list(dict.fromkeys(s for s in (node.get("split"), dataset.labeled_split, dataset.eval_split) if s))
    rows, problems, ok = [COLUMNS], [], True
    for split in splits:
        try:
            ds = dataset if split == node.get("split") else build(node, split=split)
        except HJEPAError as e:
            problems.append(f"  {split}: {e}")
            ok = False
            continue
        per_class = collections.Counter(t for t in ds.targets if t >= 0)
        unreadable = _unreadable(ds, full)
        counts = [per_class.get(c, 0) for c in range(len(ds.classes))]
        missing = [ds.classes[c] for c, n in enumerate(counts) if n == 0]
        rows.append((
            split,
            f"{len(ds.classes) - len(missing)}/{len(ds.classes)}",
            str(len(missing)),
            str(len(ds)),
            f"{min(counts)}-{max(counts)}" if per_class else "-",
            str(len(ds) - sum(counts)),
            "-" if unreadable is None else str(len(unreadable)),
        ))
        if missing:
            problems.append(f"  {split}: no images for class(es) {', '.join(map(str, missing[:MAX_LISTED]))}")
        for path, why in (unreadable or [])[:MAX_LISTED]:
            problems.append(f"  {split}: unreadable {path}: {why}")
        if unreadable and len(unreadable) > MAX_LISTED:
            problems.append(f"  {split}: ... and {len(unreadable) - MAX_LISTED} more unreadable files")
        if unreadable and ds.on_error == "raise":
            problems.append(f"  {split}: on_error is 'raise', so training stops at the first of them")
            ok = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for row in rows if len(rows) > 1 else []:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for line in problems:
        print(line)
    return ok


def _dataset_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """The mixture's components by name, or cfg.dataset named after its config choice."""
    choice = HydraConfig.get().runtime.choices.get("dataset") if HydraConfig.initialized() else None
    return dataset_configs(cfg, choice)


def _unreadable(ds: Any, full: bool) -> list[tuple[str, str]] | None:
    """(path, reason) of the files of a file-backed dataset that cannot be read; None for
    datasets without files (in-memory or generated)."""
    if not isinstance(ds, FileDataset):
        return None
    bad = []
    for path, _label in ds.samples:
        if full:
            try:
                decode_image(path)
            except UnreadableImageError as e:
                bad.append((path, str(e).removeprefix(f"{path}: ")))
            continue
        try:
            with open(path, "rb") as f:
                header = f.read(12)
        except OSError as e:
            bad.append((path, f"cannot open ({e.strerror})"))
            continue
        if not header:
            bad.append((path, "empty file (0 bytes)"))
        elif sniff_format(header) is None:
            bad.append((path, "not an image (unknown format)"))
    return bad


def _free_disk(path: Path) -> str:
    while not path.exists() and path != path.parent:  # an absent root: where it would go
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB"
    except OSError:
        return "unknown"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    sys.exit(0 if verify(cfg, full=bool(cfg.get("full", False))) else 1)


def main() -> None:
    # verify only reads: keep Hydra from creating a run directory, .hydra/ and a log file.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _app()


if __name__ == "__main__":
    main()
