"""Make an ImageNet-100 folder, <out>/{train,val}/<wnid>/*.JPEG, from what you have:

    # the official ILSVRC2012 archives (train: a tar of per-class tars; val: flat; the devkit has the val labels)
    python -m hjepa.data.build_imagenet100 --archives ~/Downloads --out /data/imagenet100
    # the Kaggle download, unzipped (ILSVRC/Data/CLS-LOC/{train/<wnid>,val}/ and LOC_val_solution.csv)
    python -m hjepa.data.build_imagenet100 --kaggle ~/imagenet-object-localization-challenge --out /data/imagenet100
    # an unpacked ImageNet folder <root>/{train,val}/<wnid>/: symbolic links (default), hard links or copies
    python -m hjepa.data.build_imagenet100 --folder /data/imagenet --out /data/imagenet100 --link copy

Only the 100 classes of the CMC list (hjepa/data/imagenet100.txt; `--subset FILE` for
another wnid list) are read and written: the other 900 are never unpacked. Each class is
written into <out>/<split>/.<wnid>.partial/ and renamed to <wnid>/ when complete, so an
interrupted build continues where it stopped when the same command is run again (finished
classes are skipped). Before writing anything it checks the free disk space against what
it will write; at the end it verifies the result with `hjepa.data.verify` and prints the
training command. Bad input (a missing archive, a wrong layout, too little space) is one
line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import errno
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

from tqdm import tqdm

from hjepa.data.decode import IMAGE_EXTENSIONS
from hjepa.data.folder import name_few
from hjepa.data.imagenet import read_wnids
from hjepa.errors import DataError, HJEPAError

SPLITS = ("train", "val")
LINKS = ("symlink", "hardlink", "copy")
BLOCK = 4096  # a written file occupies whole blocks
# The official file names (as torchvision.datasets.imagenet.ARCHIVE_META has them).
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_DIR, KAGGLE_VAL_CSV = Path("ILSVRC", "Data", "CLS-LOC"), "LOC_val_solution.csv"


@dataclass
class ClassJob:
    """One class of one split: where its images come from and how to write them."""

    split: str
    wnid: str
    write: Callable[[Path, "Progress"], int]  # fills a folder, returns the number of images written
    bytes: int                                 # disk space the written files take
    work: int                                  # progress units (bytes read or images)
    expected: Optional[int] = None             # images the class must end with, when known up front


@dataclass
class Plan:
    source: str
    jobs: list[ClassJob] = field(default_factory=list)   # classes still to write
    done: list[ClassJob] = field(default_factory=list)   # classes already complete in <out>
    unit: str = "img"
    cleanup: list[Callable[[], None]] = field(default_factory=list)


class Progress:
    """A tqdm bar per split (on stderr), or nothing when `quiet`."""

    def __init__(self, total: int, unit: str, desc: str, quiet: bool):
        scale = unit == "B"
        self.bar = None if quiet else tqdm(total=total, unit=unit, unit_scale=scale, desc=desc, mininterval=1.0,
                                           file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    return path


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path} is not a readable tar archive ({e})") from None


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise DataError(f"{tar.name}: {member.name} is not a regular file")
    with source, open(dest, "wb") as f:
        shutil.copyfileobj(source, f, 1 << 20)


# ---------------------------------------------------------------- the official archives

def read_devkit(devkit: Path, trust: bool) -> list[str]:
    """The wnid of every validation image, in file-name order, from the ILSVRC2012 devkit,
    read by torchvision's own parser (which checks the official devkit's md5)."""
    import torchvision.datasets.imagenet as tv
    from torchvision.datasets.utils import check_integrity

    _check_file(devkit, "devkit")
    official_name, md5 = tv.ARCHIVE_META["devkit"]
    if not trust and not check_integrity(str(devkit), md5):
        raise DataError(f"{devkit}: not the official ILSVRC2012 devkit ({official_name}: its md5 differs from "
                        f"{md5}); a devkit you re-packed is read with --trust-devkit")
    try:
        import scipy.io  # noqa: F401  (torchvision's parser reads data/meta.mat with it)
    except ImportError:
        raise DataError("reading the devkit's meta.mat needs scipy: pip install scipy") from None
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(devkit.resolve(), Path(tmp) / devkit.name)
        try:
            # the md5 was checked above (or waived with --trust-devkit)
            with mock.patch.dict(tv.ARCHIVE_META, {"devkit": (devkit.name, None)}):
                tv.parse_devkit_archive(tmp, devkit.name)
            _, val_wnids = tv.load_meta_file(tmp)
        except Exception as e:  # a tar without data/meta.mat, a broken .mat, ...
            raise DataError(f"{devkit}: cannot read the ILSVRC2012 devkit ({type(e).__name__}: {e}); expected "
                            "ILSVRC2012_devkit_t12/data/meta.mat and ILSVRC2012_validation_ground_truth.txt") from None
    return list(val_wnids)


def plan_archives(args: argparse.Namespace, wnids: list[str], plan: Plan) -> None:
    folder = Path(args.archives).expanduser()
    if not folder.is_dir():
        raise DataError(f"--archives {folder} is not a folder (expected one holding {TRAIN_TAR}, {VAL_TAR} "
                        f"and {DEVKIT})")
    train_tar = _check_file(Path(args.train_tar).expanduser() if args.train_tar else folder / TRAIN_TAR,
                            "train archive")
    val_tar = _check_file(Path(args.val_tar).expanduser() if args.val_tar else folder / VAL_TAR, "val archive")
    devkit = _check_file(Path(args.devkit).expanduser() if args.devkit else folder / DEVKIT, "devkit")
    plan.unit = "B"

    # train: one <wnid>.tar per class inside the outer tar, read in place (seeking, not unpacking)
    outer = _open_tar(train_tar)
    plan.cleanup.append(outer.close)
    members = {Path(m.name).name.removesuffix(".tar"): m for m in outer.getmembers()
               if m.isfile() and m.name.endswith(".tar")}
    missing = [w for w in wnids if w not in members]
    if missing:
        raise DataError(f"{train_tar}: no per-class archive for {len(missing)} of the {len(wnids)} classes "
                        f"({name_few([w + '.tar' for w in missing])}); expected the ILSVRC2012 train archive, "
                        "a tar of <wnid>.tar files")
    for wnid in wnids:
        member = members[wnid]
        plan.jobs.append(ClassJob("train", wnid, _train_writer(outer, member), member.size, member.size))

    # val: flat ILSVRC2012_val_<n>.JPEG files; the devkit's labels are in file-name order
    val_wnids = read_devkit(devkit, args.trust_devkit)
    vt = _open_tar(val_tar)
    plan.cleanup.append(vt.close)
    images = sorted((m for m in vt.getmembers() if m.isfile() and _is_image(m.name)), key=lambda m: Path(m.name).name)
    if len(images) != len(val_wnids):
        raise DataError(f"{val_tar} holds {len(images)} images but the devkit {devkit} labels {len(val_wnids)}: "
                        "expected the ILSVRC2012 validation archive with its devkit")
    by_class: dict[str, list[tarfile.TarInfo]] = {w: [] for w in wnids}
    for member, wnid in zip(images, val_wnids):
        if wnid in by_class:
            by_class[wnid].append(member)
    for wnid in wnids:
        ms = by_class[wnid]
        if not ms:
            raise DataError(f"the devkit {devkit} labels no validation image as {wnid}")
        plan.jobs.append(ClassJob("val", wnid, _members_writer(vt, ms), sum(_blocks(m.size) for m in ms),
                                  sum(m.size for m in ms), expected=len(ms)))


def _train_writer(outer: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[Path, Progress], int]:
    def write(folder: Path, progress: Progress) -> int:
        n = 0
        inner_file = outer.extractfile(member)
        try:
            with inner_file, tarfile.open(fileobj=inner_file, mode="r|") as inner:
                for m in inner:
                    if m.isfile() and _is_image(m.name):
                        _copy_member(inner, m, folder / Path(m.name).name)
                        n += 1
                    progress.update(m.size + 512)
        except tarfile.TarError as e:
            raise DataError(f"{outer.name}: {member.name} is not a readable tar archive ({e})") from None
        if n == 0:
            raise DataError(f"{outer.name}: {member.name} holds no images")
        return n

    return write


def _members_writer(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> Callable[[Path, Progress], int]:
    def write(folder: Path, progress: Progress) -> int:
        for m in sorted(members, key=lambda m: m.offset):  # in archive order: sequential reads
            _copy_member(tar, m, folder / Path(m.name).name)
            progress.update(m.size)
        return len(members)

    return write


# ---------------------------------------------------------------- files already on disk

def plan_kaggle(args: argparse.Namespace, wnids: list[str], plan: Plan) -> None:
    root = Path(args.kaggle).expanduser()
    base = root / KAGGLE_DIR
    csv_path = root / KAGGLE_VAL_CSV
    for path in (base / "train", base / "val", csv_path):
        if not path.exists():
            raise DataError(f"--kaggle {root}: {path} does not exist; expected the unzipped Kaggle ImageNet "
                            f"download: {KAGGLE_DIR}/train/<wnid>/, {KAGGLE_DIR}/val/ and {KAGGLE_VAL_CSV}")
    _plan_train_folders(base / "train", wnids, args.link, plan)
    labels = _read_kaggle_csv(csv_path)
    _plan_flat_val(base / "val", labels, csv_path, wnids, args.link, plan)


def _read_kaggle_csv(path: Path) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (ImageId,PredictionString "<wnid> x y x y ...")."""
    labels = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DataError(f"{path}: expected the header ImageId,PredictionString, got {header}")
        for n, row in enumerate(reader, 2):
            words = row[1].split() if len(row) >= 2 else []
            if not words or not words[0].startswith("n"):
                raise DataError(f"{path}:{n}: expected an image id and a prediction string starting with a wnid, "
                                f"got {row}")
            labels[row[0]] = words[0]
    return labels


def plan_folder(args: argparse.Namespace, wnids: list[str], plan: Plan) -> None:
    root = Path(args.folder).expanduser()
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(f"--folder {root}: expected an unpacked ImageNet folder with train/<wnid>/ and val/<wnid>/ "
                        "(for the archives use --archives, for the Kaggle download --kaggle)")
    _plan_train_folders(root / "train", wnids, args.link, plan)
    val = root / "val"
    if all((val / w).is_dir() for w in wnids):
        _plan_train_folders(val, wnids, args.link, plan, split="val")
        return
    with os.scandir(val) as entries:
        flat = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if not flat:
        missing = [w for w in wnids if not (val / w).is_dir()]
        raise DataError(f"{val}: no folder for {len(missing)} of the {len(wnids)} classes ({name_few(missing)})")
    if not args.devkit:
        raise DataError(f"{val} holds the validation images directly, not in class folders: add --devkit "
                        f"<{DEVKIT}> to sort them by the official labels")
    val_wnids = read_devkit(Path(args.devkit).expanduser(), args.trust_devkit)
    names = sorted(flat)
    if len(names) != len(val_wnids):
        raise DataError(f"{val} holds {len(names)} images but the devkit labels {len(val_wnids)}")
    labels = {Path(name).stem: wnid for name, wnid in zip(names, val_wnids)}
    _plan_flat_val(val, labels, Path(args.devkit), wnids, args.link, plan)


def _plan_train_folders(folder: Path, wnids: list[str], link: str, plan: Plan, split: str = "train") -> None:
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        raise DataError(f"{folder}: no folder for {len(missing)} of the {len(wnids)} classes ({name_few(missing)})")
    for wnid in wnids:
        with os.scandir(folder / wnid) as entries:
            files = sorted(Path(e.path) for e in entries if _is_image(e.name) and e.is_file())
        if not files:
            raise DataError(f"{folder / wnid} holds no images")
        plan.jobs.append(_files_job(split, wnid, files, link))


def _plan_flat_val(folder: Path, labels: dict[str, str], labels_from: Path, wnids: list[str], link: str,
                   plan: Plan) -> None:
    by_class: dict[str, list[Path]] = {w: [] for w in wnids}
    with os.scandir(folder) as entries:
        present = {Path(e.name).stem: Path(e.path) for e in entries if _is_image(e.name)}
    for image_id, wnid in labels.items():
        if wnid in by_class:
            if image_id not in present:
                raise DataError(f"{labels_from} lists {image_id} ({wnid}) but {folder} has no such image")
            by_class[wnid].append(present[image_id])
    for wnid in wnids:
        if not by_class[wnid]:
            raise DataError(f"{labels_from} labels no validation image as {wnid}")
        plan.jobs.append(_files_job("val", wnid, sorted(by_class[wnid]), link))


def _files_job(split: str, wnid: str, files: list[Path], link: str) -> ClassJob:
    size = sum(_blocks(f.stat().st_size) for f in files) if link == "copy" else 0

    def write(folder: Path, progress: Progress) -> int:
        for src in files:
            dest = folder / src.name
            if link == "symlink":
                os.symlink(src.resolve(), dest)
            elif link == "hardlink":
                os.link(src, dest)
            else:
                shutil.copyfile(src, dest)
            progress.update(1)
        return len(files)

    return ClassJob(split, wnid, write, size, len(files), expected=len(files))


# ---------------------------------------------------------------- building

def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_space(plan: Plan, out: Path) -> None:
    need = sum(job.bytes for job in plan.jobs)
    where = _existing_parent(out)
    free = shutil.disk_usage(where).free
    if need > free:
        raise DataError(f"not enough disk space at {where}: {len(plan.jobs)} class folders need {_gib(need)}, "
                        f"{_gib(free)} free (free space, pick another --out, or --link symlink for a folder source)")
    print(f"disk: {_gib(need)} to write, {_gib(free)} free at {where}")


def check_hardlinks(source: Path, out: Path) -> None:
    if os.stat(source).st_dev != os.stat(_existing_parent(out)).st_dev:
        raise DataError(f"--link hardlink: {source} and {out} are on different filesystems, where hard links are "
                        "impossible; use --link symlink or --link copy")


def split_pending(plan: Plan, out: Path) -> None:
    """Move the classes already complete in <out> from jobs to done; remove leftovers of an
    interrupted run (.<wnid>.partial folders, which are ours)."""
    pending = []
    for job in plan.jobs:
        final, partial = out / job.split / job.wnid, out / job.split / f".{job.wnid}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        (plan.done if final.is_dir() else pending).append(job)
    plan.jobs = pending


def build(plan: Plan, out: Path, quiet: bool = False) -> dict[str, int]:
    """Write every pending class (folder by folder, renamed when complete); images written per split."""
    written = {s: 0 for s in SPLITS}
    for split in SPLITS:
        jobs = [j for j in plan.jobs if j.split == split]
        if not jobs:
            continue
        (out / split).mkdir(parents=True, exist_ok=True)
        progress = Progress(sum(j.work for j in jobs), plan.unit, f"{split}: {len(jobs)} classes", quiet)
        try:
            for job in jobs:
                partial, final = out / split / f".{job.wnid}.partial", out / split / job.wnid
                partial.mkdir()
                n = job.write(partial, progress)
                if job.expected is not None and n != job.expected:
                    raise DataError(f"{job.wnid} ({split}): wrote {n} images, expected {job.expected}")
                job.expected = n
                os.rename(partial, final)
                written[split] += n
        finally:
            progress.close()
    return written


def check_counts(plan: Plan, out: Path) -> None:
    """Every class folder, also those kept from an earlier run, has as many images as its source."""
    wrong = []
    for job in plan.done + plan.jobs:
        if job.expected is None:
            continue
        folder = out / job.split / job.wnid
        with os.scandir(folder) as entries:
            n = sum(1 for e in entries if _is_image(e.name))
        if n != job.expected:
            wrong.append(f"{folder} ({n} images, the source has {job.expected})")
    if wrong:
        raise DataError(f"incomplete class folders: {name_few(wrong, 3)}; delete them and run the same command again")


def verify_result(out: Path, subset: str) -> bool:
    from omegaconf import OmegaConf

    from hjepa.data.verify import verify_dataset

    node = OmegaConf.create({"_target_": "hjepa.data.imagenet.ImageNet", "root": str(out), "split": "train",
                             "subset": subset, "on_error": "skip"})
    return verify_dataset("imagenet100" if subset == "imagenet100" else f"subset {Path(subset).name}", node)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hjepa.data.build_imagenet100", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--archives", metavar="DIR",
                     help=f"folder with the official {TRAIN_TAR}, {VAL_TAR} and {DEVKIT}")
    src.add_argument("--kaggle", metavar="DIR", help=f"the unzipped Kaggle download ({KAGGLE_DIR}/, {KAGGLE_VAL_CSV})")
    src.add_argument("--folder", metavar="DIR", help="an unpacked ImageNet folder with train/<wnid>/ and val/")
    p.add_argument("--out", required=True, metavar="DIR", help="where <out>/{train,val}/<wnid>/ go")
    p.add_argument("--link", choices=LINKS, default="symlink",
                   help="for --kaggle and --folder: symbolic links (default, no space), hard links (same "
                        "filesystem) or copies (a standalone folder)")
    p.add_argument("--subset", default="imagenet100", help="imagenet100 (the CMC list) or a file of wnids")
    p.add_argument("--train-tar", metavar="FILE", help=f"the train archive, if not <archives>/{TRAIN_TAR}")
    p.add_argument("--val-tar", metavar="FILE", help=f"the val archive, if not <archives>/{VAL_TAR}")
    p.add_argument("--devkit", metavar="FILE",
                   help=f"the devkit, if not <archives>/{DEVKIT}; with --folder, labels a flat val/ folder")
    p.add_argument("--trust-devkit", action="store_true", help="accept a devkit whose md5 is not the official one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.link != "symlink" and a.archives:
        p.error("--link applies to --kaggle and --folder (archives are always unpacked)")
    if (a.train_tar or a.val_tar) and not a.archives:
        p.error("--train-tar and --val-tar go with --archives")
    return a


def run(a: argparse.Namespace) -> bool:
    wnids, name = read_wnids(a.subset)
    out = Path(a.out).expanduser().absolute()
    source = Path(a.archives or a.kaggle or a.folder).expanduser().absolute()
    if out == source:
        raise DataError(f"--out {out} is the source folder itself: choose a new folder for ImageNet-100")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    kind = "archives" if a.archives else "kaggle" if a.kaggle else "folder"
    plan = Plan(kind)
    try:
        {"archives": plan_archives, "kaggle": plan_kaggle, "folder": plan_folder}[kind](a, wnids, plan)
        split_pending(plan, out)
        print(f"{name}: {len(wnids)} classes from {source} ({kind}) into {out}: {len(plan.done)} of "
              f"{len(plan.done) + len(plan.jobs)} class folders (train + val) already complete, {len(plan.jobs)} to write"
              + (f" ({a.link})" if kind != "archives" and plan.jobs else ""))
        if plan.jobs:
            if a.link == "hardlink" and kind != "archives":
                check_hardlinks(source, out)
            check_space(plan, out)
            written = build(plan, out, a.quiet)
            print("written: " + ", ".join(f"{s} {n} images" for s, n in written.items() if n))
        check_counts(plan, out)
    finally:
        for close in plan.cleanup:
            close()
    ok = verify_result(out, a.subset)
    print("usable" if ok else "NOT usable: see the messages above")
    if ok:
        print(f"train on it: python -m hjepa.train dataset=imagenet100 dataset.root={out}"
              + ("" if a.subset == "imagenet100" else f" dataset.subset={a.subset}"))
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    try:
        return 0 if run(a) else 1
    except HJEPAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue (finished classes are kept)", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"error: the disk filled up while writing ({e}); free space and run the same command again "
                  "(finished classes are kept)", file=sys.stderr)
            return 1
        if e.errno == errno.EXDEV:
            print(f"error: a hard link cannot cross filesystems ({e}); use --link symlink or --link copy",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
