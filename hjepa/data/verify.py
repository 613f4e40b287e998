"""Check that a dataset, or every component of a mixture, is usable before training on it.

    python -m hjepa.data.verify dataset=imagenet100 dataset.root=/data/imagenet
    python -m hjepa.data.verify mixture=foundation_mini full=true

For every split a run uses (pretraining, labeled and eval split) it prints the classes found
and missing, image counts (total, min and max per class, unlabeled), unreadable files and
the free disk space at the root, compared with what an absent dataset needs; absent or
misplaced data are reported with how to obtain or fix them, every broken split and every
class without a readable image, not only the first. Files are checked cheaply (empty, no
known image format in their leading bytes, more pixels than dataset.max_pixels in their
header); `full=true` decodes every image exactly as training does (the run's train
transform on the pretraining split, the eval transform on the others). Exit status 0 when
usable, 1 otherwise. It writes nothing and downloads nothing: no run directory, no .hydra/
copy, no log file.
"""

from __future__ import annotations

import collections
import inspect
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import hydra.utils
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hjepa import CONF_DIR
from hjepa.config import build, dataset_configs
from hjepa.data.decode import UnreadableImageError, check_pixels, image_size, sniff_format
from hjepa.data.folder import FileDataset
from hjepa.data.transforms import eval_transform
from hjepa.errors import HJEPAError, MissingDataError

MAX_LISTED = 10
COLUMNS = ("split", "classes", "missing", "images", "per class", "unlabeled", "unreadable")
HEADER_BYTES = 65536  # enough for a JPEG's size after its EXIF block

# What an absent dataset needs on disk: the download plus what it unpacks to (bytes).
NEEDS = {
    "CIFAR10": 170_498_071 + 178_000_000,
    "CIFAR100": 169_001_437 + 178_000_000,
    "STL10": 2_640_397_119 + 3_100_000_000,
    "ImageNet": 147_897_477_120 + 6_744_924_160,  # ILSVRC2012 train + val tars, kept unpacked
}
IMAGENET_CLASSES = 1000


def verify(cfg: DictConfig, full: bool = False) -> bool:
    """Print the report for every dataset of `cfg`; True when all of them are usable."""
    transforms = {"train": build(cfg.transform), "eval": eval_transform(cfg.image_size)}
    mixture = cfg.get("mixture") is not None
    results = [verify_dataset(name, node, full, transforms, f"mixture.components.{name}.dataset" if mixture else "dataset")
               for name, node in _dataset_nodes(cfg).items()]
    ok = all(results)
    print("usable" if ok else "NOT usable: see the messages above")
    return ok


def verify_dataset(name: str, node: DictConfig, full: bool = False,
                   transforms: Optional[dict[str, Callable]] = None, key: str = "dataset") -> bool:
    """Print the report of one dataset config; True when usable. `transforms` ("train",
    "eval"): what training applies, for full=True (default: decode only); `key`: where the
    config sets it, named when the data are absent."""
    cls = hydra.utils.get_class(node._target_)
    # Never download, never decode a whole cache: verify only looks.
    params = inspect.signature(cls).parameters
    offline = {k: v for k, v in (("download", False), ("cache", "none")) if k in params}
    root = node.get("root")
    print(f"{name}: {node._target_}" + (f" at {Path(root).expanduser().resolve()}" if root else ""))
    rows, problems, ok, absent = [COLUMNS], [], True, False
    own = node.get("split")
    splits = [own] if own else []
    # eval_split is known from the class here, or once a split is built (an image folder's holdout)
    for split in [own, cls.labeled_split, cls.eval_split]:
        if split and split not in splits:
            splits.append(split)
    checked = set()
    while splits:
        split = splits.pop(0)
        checked.add(split)
        transform = transforms["train" if split == own else "eval"] if full and transforms else None
        try:
            ds = build(node, split=split, transform=transform, **offline)
        except HJEPAError as e:
            problems.append(f"  {split}: {e}")
            absent |= isinstance(e, MissingDataError)
            ok = False
            continue
        if ds.eval_split and ds.eval_split not in checked and ds.eval_split not in splits:
            splits.append(ds.eval_split)  # known once built (an image folder's holdout or val_root)
        row, split_problems, usable = _check_split(split, ds, full)
        rows.append(row)
        problems += split_problems
        ok &= usable
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for row in rows if len(rows) > 1 else []:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for line in problems:
        print(line)
    if absent and root:
        print(f"  (set {key}.root=<folder>, or data_root=<the folder holding your datasets>)")
    if root:
        print(f"  disk: {_disk_report(Path(root).expanduser(), _needs(node) if absent else None)}")
    return ok


def _check_split(split: str, ds: Any, full: bool) -> tuple[tuple[str, ...], list[str], bool]:
    """(table row, problems, usable?) of one built split."""
    unreadable = _unreadable(ds, full)
    bad = {path for path, _ in unreadable or []}
    per_class = collections.Counter(t for t in ds.targets if t >= 0)
    readable = per_class
    if isinstance(ds, FileDataset):
        readable = collections.Counter(t for path, t in ds.samples if t >= 0 and path not in bad)
    counts = [per_class.get(c, 0) for c in range(len(ds.classes))]
    missing = [ds.classes[c] for c, n in enumerate(counts) if n == 0]
    unreadable_only = [ds.classes[c] for c in range(len(ds.classes)) if counts[c] and not readable.get(c)]
    row = (
        split,
        f"{len(ds.classes) - len(missing)}/{len(ds.classes)}",
        str(len(missing)),
        str(len(ds)),
        f"{min(counts)}-{max(counts)}" if per_class else "-",
        str(len(ds) - sum(counts)),
        "-" if unreadable is None else str(len(unreadable)),
    )
    problems, usable = [], True
    if missing:
        problems.append(f"  {split}: no images for class(es) {', '.join(map(str, missing[:MAX_LISTED]))}")
        usable = False
    if unreadable_only:
        problems.append(f"  {split}: no readable image in class(es) {', '.join(map(str, unreadable_only[:MAX_LISTED]))}"
                        + (f" and {len(unreadable_only) - MAX_LISTED} more" if len(unreadable_only) > MAX_LISTED else ""))
        usable = False
    if len(ds) and unreadable is not None and len(unreadable) >= len(ds):
        problems.append(f"  {split}: not one readable image")
        usable = False
    for path, why in (unreadable or [])[:MAX_LISTED]:
        problems.append(f"  {split}: unreadable {path}: {why}")
    if unreadable and len(unreadable) > MAX_LISTED:
        problems.append(f"  {split}: ... and {len(unreadable) - MAX_LISTED} more unreadable files")
    if unreadable and ds.on_error == "raise":
        problems.append(f"  {split}: on_error is 'raise', so training stops at the first of them")
        usable = False
    return row, problems, usable


def _dataset_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """The mixture's components by name, or cfg.dataset named after its config choice."""
    choice = HydraConfig.get().runtime.choices.get("dataset") if HydraConfig.initialized() else None
    return dataset_configs(cfg, choice)


def _unreadable(ds: Any, full: bool) -> Optional[list[tuple[str, str]]]:
    """(path, reason) of the entries of a file-backed dataset that training would skip; None
    for datasets without files (in memory or generated). `full`: decode each item exactly as
    training does; else check what the first bytes say."""
    if not isinstance(ds, FileDataset):
        return None
    bad = list(ds.unlisted)
    for index, (path, _label) in enumerate(ds.samples):
        why = ds.problem(index) if full else _header_problem(path, ds.max_pixels)
        if why:
            bad.append((path, why))
    return bad


def _header_problem(path: str, max_pixels: int) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as e:
        return f"cannot open ({e.strerror})"
    if not header:
        return "empty file (0 bytes)"
    if sniff_format(header[:12]) is None:
        return "not an image (unknown format)"
    try:
        check_pixels(image_size(torch.frombuffer(bytearray(header), dtype=torch.uint8)), path, max_pixels)
    except UnreadableImageError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def _needs(node: DictConfig) -> Optional[int]:
    name = str(node._target_).rsplit(".", 1)[-1]
    need = NEEDS.get(name)
    if need is not None and name == "ImageNet" and node.get("subset"):
        from hjepa.data.imagenet import read_wnids

        try:
            need = need * len(read_wnids(node.subset)[0]) // IMAGENET_CLASSES  # only those classes, unpacked
        except HJEPAError:
            return None
    return need


def _disk_report(path: Path, needed: Optional[int]) -> str:
    while not path.exists() and path != path.parent:  # an absent root: where it would go
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    text = f"{free / 2**30:.1f} GiB free at {path}"
    if needed is not None:
        verdict = "enough" if free >= needed else f"NOT enough: {needed / 2**30 - free / 2**30:.1f} GiB short"
        text += f"; getting this dataset needs about {needed / 2**30:.1f} GiB ({verdict})"
    return text


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="verify")
def _app(cfg: DictConfig) -> None:
    sys.exit(0 if verify(cfg, full=cfg.full) else 1)


def main() -> None:
    # verify only reads: keep Hydra from creating a run directory, .hydra/ and a log file.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _app()


if __name__ == "__main__":
    main()
