"""`python -m hjepa.data.verify`: the report on real data, exit status, and no files written."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hjepa.data.verify import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_verify(capsys, compose_config):
    """run_verify(*overrides, full=False): (usable?, the printed report)."""

    def run(*overrides, full=False):
        ok = verify(compose_config(*overrides), full=full)
        return ok, capsys.readouterr().out

    return run


@pytest.fixture
def imagenet_root(imagenet_tree, tmp_path):
    return imagenet_tree(tmp_path / "imagenet")


def test_imagenet100_report(imagenet_root, run_verify):
    ok, out = run_verify("dataset=imagenet100", f"dataset.root={imagenet_root}")
    assert ok, out
    lines = out.splitlines()
    assert str(imagenet_root) in lines[0]
    assert lines[1].split() == ["split", "classes", "missing", "images", "per", "class", "unlabeled", "unreadable"]
    assert lines[2].split() == ["train", "100/100", "0", "100", "1-1", "0", "0"]
    assert lines[3].split() == ["val", "100/100", "0", "100", "1-1", "0", "0"]
    assert lines[4].startswith("  disk: ") and "GiB free at" in lines[4] and "needs" not in lines[4]  # present
    assert lines[-1] == "usable"


def test_missing_classes_and_unreadable_files_are_reported(imagenet_root, run_verify):
    val = imagenet_root / "val"
    for wnid in ("n01558993", "n01692333", "n01729322"):  # three ImageNet-100 classes gone from val
        for f in os.listdir(val / wnid):
            os.remove(val / wnid / f)
        os.rmdir(val / wnid)
    train = imagenet_root / "train" / "n01749939"
    (train / "empty.JPEG").write_bytes(b"")
    (train / "notes.JPEG").write_text("not an image")
    jpeg = next(train.glob("n*.JPEG")).read_bytes()
    (train / "truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 2])  # valid header: only full=true finds it
    ok, out = run_verify("dataset=imagenet100", f"dataset.root={imagenet_root}")
    assert not ok
    assert "train  100/100  0        103" in out and "2" == out.splitlines()[2].split()[-1]
    assert f"unreadable {train / 'empty.JPEG'}: empty file (0 bytes)" in out
    assert f"unreadable {train / 'notes.JPEG'}: not an image" in out
    assert "val: 3 of the 100 ImageNet-100 classes have no folder in" in out and "n01558993" in out
    assert out.splitlines()[-1].startswith("NOT usable")

    ok, out = run_verify("dataset=imagenet", f"dataset.root={imagenet_root}", "dataset.subset=null",
                      "dataset.split=train", full=True)
    assert "truncated.JPEG: not a decodable image (Image is incomplete or truncated)" in out


def test_unreadable_files_are_usable_when_skipped_not_when_raised(imagenet_root, run_verify):
    (imagenet_root / "train" / "n01558993" / "empty.JPEG").write_bytes(b"")
    ok, out = run_verify("dataset=imagenet100", f"dataset.root={imagenet_root}")
    assert ok and "empty.JPEG: empty file" in out
    ok, out = run_verify("dataset=imagenet100", f"dataset.root={imagenet_root}", "dataset.on_error=raise")
    assert not ok and "training stops at the first of them" in out


def test_generated_and_folder_datasets(cifar10_train, run_verify):
    ok, out = run_verify("dataset=synthetic")
    assert ok and "train  10/10    0        8192    819-820" in out
    ok, out = run_verify("dataset=image_folder", f"dataset.root={cifar10_train}", "dataset.holdout=500")
    assert ok and "val    10/10    0        5000    500-500    0          0" in out


def test_absent_mixture_components_say_how_to_get_them(imagenet_root, tmp_path, run_verify):
    ok, out = run_verify("mixture=foundation_mini", f"data_root={tmp_path}",
                      f"mixture.components.imagenet100.dataset.root={imagenet_root}",
                      "mixture.components.stl10.dataset.download=false",
                      "mixture.components.cifar100.dataset.download=false")
    assert not ok
    assert "imagenet100: hjepa.data.imagenet.ImageNet" in out and "  train  100/100" in out
    assert "STL-10 not found" in out and "stl10_binary.tar.gz" in out
    assert "(set mixture.components.stl10.dataset.root=<folder>, or data_root=" in out
    assert "CIFAR-100 not found" in out and "cifar-100-python.tar.gz" in out


def test_command_line_exit_status_and_no_files_written(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = sorted(os.listdir(ROOT / "outputs")) if (ROOT / "outputs").exists() else []
    result = subprocess.run(
        [sys.executable, "-m", "hjepa.data.verify", "dataset=imagenet", f"dataset.root={tmp_path / 'absent'}"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "ImageNet root" in result.stdout and "image-net.org" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not any(cwd.iterdir())
    assert (sorted(os.listdir(ROOT / "outputs")) if (ROOT / "outputs").exists() else []) == before


def test_verify_decodes_as_training_does_and_names_every_bad_file(make_bad_tree, tmp_path, run_verify):
    cases = make_bad_tree(tmp_path / "tree")
    base = ["dataset=image_folder", f"dataset.root={tmp_path / 'tree'}", "dataset.max_pixels=4000000"]
    ok, out = run_verify(*base, full=True)
    assert not ok and out.splitlines()[-1].startswith("NOT usable")
    assert "train: no readable image in class(es) all_bad" in out
    for path, reason in cases.items():  # the odd but valid files (16-bit, animated, CMYK...) are not listed
        assert (f"unreadable {path}: " in out) == (reason is not None), path
    assert f"unreadable {tmp_path / 'tree' / 'mixed' / 'broken_link.jpg'}: broken symbolic link" in out
    # Without decoding, the header checks find the empty, non-image and oversized files.
    ok, out = run_verify(*base)
    for name in ("zero_bytes.jpg", "text.jpg", "huge.png", "broken_link.jpg"):
        assert f"/mixed/{name}: " in out, name
    assert "megapixels, more than dataset.max_pixels" in out


def test_a_dataset_with_no_readable_image_is_not_usable(make_bad_tree, tmp_path, run_verify):
    make_bad_tree(tmp_path / "tree")
    for cls in ("mixed", "odd_but_fine"):
        shutil.rmtree(tmp_path / "tree" / cls)
    ok, out = run_verify("dataset=image_folder", f"dataset.root={tmp_path / 'tree'}", "dataset.max_pixels=4000000",
                         full=True)
    assert not ok and "train: not one readable image" in out


def test_every_broken_split_is_reported(imagenet_root, run_verify):
    shutil.rmtree(imagenet_root / "train")  # the pretraining split is gone: val is still checked
    for wnid in ("n01558993", "n01692333"):
        shutil.rmtree(imagenet_root / "val" / wnid)
    ok, out = run_verify("dataset=imagenet100", f"dataset.root={imagenet_root}")
    assert not ok
    assert "train: ImageNet train folder" in out and "does not exist" in out
    assert "val: 2 of the 100 ImageNet-100 classes have no folder" in out


def test_verify_never_downloads_and_compares_free_space_with_what_is_needed(tmp_path, run_verify, monkeypatch):
    connections = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connections.append(a))
    ok, out = run_verify("dataset=cifar10", f"dataset.root={tmp_path / 'cifar'}")  # download: true in the config
    assert not ok and connections == [] and not (tmp_path / "cifar").exists()
    assert "CIFAR-10 not found" in out
    assert re.search(r"disk: [\d.]+ GiB free at .*; getting this dataset needs about 0\.3 GiB \(enough\)", out)
    ok, out = run_verify("dataset=imagenet100", f"dataset.root={tmp_path / 'imagenet'}")
    assert re.search(r"needs about 14\.4 GiB \((enough|NOT enough: [\d.]+ GiB short)\)", out)
