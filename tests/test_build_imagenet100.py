"""`python -m hjepa.data.build_imagenet100` on small archives and folders of each kind made
from the real ImageNet sample JPEGs: the official tars and devkit, the Kaggle layout, an
unpacked folder; only the 100 classes are written, resumably, and bad input is one line."""

import collections
import csv
import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hjepa.data import build_imagenet100 as builder
from hjepa.data.build_imagenet100 import main
from hjepa.data.imagenet import ImageNet, read_wnids

IN100, _ = read_wnids("imagenet100")


@pytest.fixture(scope="module")
def samples(imagenet_samples) -> dict[str, Path]:
    """wnid -> its one real JPEG, for the 100 classes and 3 others."""
    by_wnid = {p.name.split("_", 1)[0]: p for p in sorted(imagenet_samples.iterdir())}
    others = [w for w in sorted(by_wnid) if w not in IN100][:3]
    return {w: by_wnid[w] for w in IN100 + others}


def val_labels(samples) -> list[str]:
    """The class of validation image 1, 2, ...: every class once, shuffled."""
    wnids = sorted(samples)
    random.Random(0).shuffle(wnids)
    return wnids


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_devkit(path: Path, wnids: list[str], labels: list[str]) -> None:
    """The two files of ILSVRC2012_devkit_t12.tar.gz that torchvision's parser reads:
    data/meta.mat (synsets: ILSVRC2012_ID, WNID, words, gloss, num_children; only leaves,
    num_children 0, are classes) and the validation ground truth (one ILSVRC2012_ID per image)."""
    import scipy.io

    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.zeros(len(wnids) + 1, dtype=fields)
    for i, wnid in enumerate(wnids):
        synsets[i] = (i + 1, wnid, f"class {wnid}, another name", "a gloss", 0)
    synsets[-1] = (len(wnids) + 1, "n00001740", "entity", "not a class: it has children", 3)
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    ids = {w: i + 1 for i, w in enumerate(wnids)}
    truth = "".join(f"{ids[w]}\n" for w in labels).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)


@pytest.fixture(scope="module")
def archives(samples, tmp_path_factory) -> Path:
    """ILSVRC2012_img_train.tar (a tar of <wnid>.tar, two images per class), the flat
    ILSVRC2012_img_val.tar and the devkit with its labels, for 103 classes."""
    folder = tmp_path_factory.mktemp("archives")
    with tarfile.open(folder / builder.TRAIN_TAR, "w") as outer:
        for wnid, path in samples.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k in (1, 2):
                    add_bytes(tar, f"{wnid}_{k}.JPEG", path.read_bytes())
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    labels = val_labels(samples)
    with tarfile.open(folder / builder.VAL_TAR, "w") as tar:
        for i, wnid in enumerate(labels, 1):
            add_bytes(tar, f"ILSVRC2012_val_{i:08d}.JPEG", samples[wnid].read_bytes())
    write_devkit(folder / builder.DEVKIT, sorted(samples), labels)
    return folder


@pytest.fixture(scope="module")
def kaggle(samples, tmp_path_factory) -> Path:
    """The unzipped Kaggle layout: ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/} and LOC_val_solution.csv
    (real files, so that hard links stay on this filesystem)."""
    root = tmp_path_factory.mktemp("kaggle")
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, path in samples.items():
        (base / "train" / wnid).mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_1.JPEG").write_bytes(path.read_bytes())
    (base / "val").mkdir()
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for i, wnid in enumerate(val_labels(samples), 1):
            image_id = f"ILSVRC2012_val_{i:08d}"
            (base / "val" / f"{image_id}.JPEG").write_bytes(samples[wnid].read_bytes())
            w.writerow([image_id, f"{wnid} 10 20 110 120 {wnid} 5 5 50 50"])
    return root


def build(capsys, *argv):
    rc = main([*argv, "--quiet"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def check_imagenet100(out: Path, samples: dict[str, Path], per_class: dict[str, int]) -> None:
    """Exactly the 100 class folders per split, no leftovers, each image the right class's."""
    for split in ("train", "val"):
        assert sorted(os.listdir(out / split)) == IN100, split
        for wnid in IN100:
            files = sorted((out / split / wnid).iterdir())
            assert len(files) == per_class[split], (split, wnid)
            assert all(f.read_bytes() == samples[wnid].read_bytes() for f in files), (split, wnid)
    val = ImageNet(str(out), "val", subset="imagenet100")
    assert len(val) == 100 and sorted(val.targets) == list(range(100))


def test_from_the_official_archives(archives, samples, tmp_path, capsys):
    out = tmp_path / "imagenet100"
    rc, stdout, err = build(capsys, "--archives", str(archives), "--out", str(out), "--trust-devkit")
    assert rc == 0, stdout + err
    check_imagenet100(out, samples, {"train": 2, "val": 1})
    lines = stdout.splitlines()
    assert lines[0].endswith("0 of 200 class folders (train + val) already complete, 200 to write")
    assert "written: train 200 images, val 100 images" in lines
    # hjepa.data.verify's report
    assert lines[-6].split() == ["split", "classes", "missing", "images", "per", "class", "unlabeled", "unreadable"]
    assert lines[-5].split() == ["train", "100/100", "0", "200", "2-2", "0", "0"]
    assert lines[-4].split() == ["val", "100/100", "0", "100", "1-1", "0", "0"]
    assert lines[-3].startswith("  disk: ")
    assert lines[-2] == "usable"
    assert lines[-1] == f"train on it: python -m hjepa.train dataset=imagenet100 dataset.root={out}"


def test_the_devkit_md5_is_checked(archives, tmp_path, capsys):
    out = tmp_path / "imagenet100"
    rc, stdout, err = build(capsys, "--archives", str(archives), "--out", str(out))
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "not the official ILSVRC2012 devkit" in err and "--trust-devkit" in err
    assert not out.exists()  # checked before anything is written


def test_an_interrupted_build_resumes(archives, samples, tmp_path, capsys, monkeypatch):
    out = tmp_path / "imagenet100"
    copy = builder._copy_member
    calls = []

    def interrupt_at_the_21st_image(*args):
        calls.append(1)
        if len(calls) == 21:
            raise KeyboardInterrupt
        copy(*args)

    with monkeypatch.context() as m:
        m.setattr(builder, "_copy_member", interrupt_at_the_21st_image)
        rc, _, err = build(capsys, "--archives", str(archives), "--out", str(out), "--trust-devkit")
    assert rc == 130 and "run the same command again" in err
    # 10 classes of 2 images are complete; the 11th was being written in its .partial folder
    assert sorted(os.listdir(out / "train")) == sorted(IN100[:10] + [f".{IN100[10]}.partial"])
    finished = out / "train" / IN100[0] / f"{IN100[0]}_1.JPEG"
    inode = finished.stat().st_ino

    rc, stdout, err = build(capsys, "--archives", str(archives), "--out", str(out), "--trust-devkit")
    assert rc == 0, stdout + err
    assert "10 of 200 class folders (train + val) already complete, 190 to write" in stdout.splitlines()[0]
    assert finished.stat().st_ino == inode  # a finished class is not written again
    check_imagenet100(out, samples, {"train": 2, "val": 1})

    # a class folder damaged afterwards is named, not silently accepted
    next((out / "val" / IN100[5]).iterdir()).unlink()
    rc, stdout, err = build(capsys, "--archives", str(archives), "--out", str(out), "--trust-devkit")
    assert rc == 1 and "incomplete class folders" in err and str(out / "val" / IN100[5]) in err


@pytest.mark.parametrize("link", ["symlink", "hardlink", "copy"])
def test_from_the_kaggle_layout(kaggle, samples, tmp_path, capsys, link):
    out = tmp_path / "imagenet100"
    rc, stdout, err = build(capsys, "--kaggle", str(kaggle), "--out", str(out), "--link", link)
    assert rc == 0, stdout + err
    check_imagenet100(out, samples, {"train": 1, "val": 1})
    image = out / "train" / IN100[0] / f"{IN100[0]}_1.JPEG"
    source = kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "train" / IN100[0] / image.name
    assert image.is_symlink() == (link == "symlink")
    assert os.path.samefile(image, source) == (link != "copy")  # a hard link is the same file
    assert "disk: 0.00 GiB to write" in stdout or link == "copy"


def test_from_an_unpacked_folder(imagenet_tree, samples, tmp_path, capsys):
    source = imagenet_tree(tmp_path / "imagenet")  # all 1,000 classes, symlinks to the samples
    out = tmp_path / "imagenet100"
    rc, stdout, err = build(capsys, "--folder", str(source), "--out", str(out))
    assert rc == 0, stdout + err
    check_imagenet100(out, samples, {"train": 1, "val": 1})
    link = next((out / "train" / IN100[0]).iterdir())
    assert link.is_symlink() and Path(os.readlink(link)).is_absolute()


def test_an_unpacked_folder_with_a_flat_val(archives, samples, tmp_path, capsys):
    """val/ as the val tar unpacks (no class folders): sorted by the devkit's labels."""
    source = tmp_path / "imagenet"
    for wnid, path in samples.items():
        (source / "train" / wnid).mkdir(parents=True)
        (source / "train" / wnid / path.name).symlink_to(path)
    (source / "val").mkdir()
    with tarfile.open(archives / builder.VAL_TAR) as tar:
        tar.extractall(source / "val", filter="data")
    out = tmp_path / "imagenet100"
    rc, _, err = build(capsys, "--folder", str(source), "--out", str(out))
    assert rc == 1 and "add --devkit" in err and not out.exists()
    rc, stdout, err = build(capsys, "--folder", str(source), "--out", str(out), "--link", "copy",
                            "--devkit", str(archives / builder.DEVKIT), "--trust-devkit")
    assert rc == 0, stdout + err
    check_imagenet100(out, samples, {"train": 1, "val": 1})


@pytest.mark.parametrize("case", ["no archives", "not a train tar", "kaggle without csv", "no train folder",
                                  "too little space"])
def test_bad_input_is_one_line_and_writes_nothing(case, archives, kaggle, tmp_path, capsys, monkeypatch):
    out = tmp_path / "imagenet100"
    empty = tmp_path / "empty"
    empty.mkdir()
    argv, message = {
        "no archives": (["--archives", str(empty)], f"train archive {empty / builder.TRAIN_TAR} does not exist"),
        "not a train tar": (["--archives", str(archives), "--train-tar", str(archives / builder.VAL_TAR)],
                            "no per-class archive for 100 of the 100 classes"),
        "kaggle without csv": (["--kaggle", str(empty)], "expected the unzipped Kaggle ImageNet download"),
        "no train folder": (["--folder", str(empty)], "expected an unpacked ImageNet folder with train/<wnid>/"),
        "too little space": (["--kaggle", str(kaggle), "--link", "copy"], "not enough disk space"),
    }[case]
    if case == "too little space":
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(builder.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    rc, stdout, err = build(capsys, *argv, "--out", str(out), "--trust-devkit")
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_command_line_error_exit_status(tmp_path):
    cmd = [sys.executable, "-m", "hjepa.data.build_imagenet100", "--folder", str(tmp_path / "absent"),
           "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 1
    assert result.stderr.startswith("error: --folder") and result.stderr.count("\n") == 1
