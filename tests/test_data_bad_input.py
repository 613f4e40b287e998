"""Every bad input of the data layer gives one clear message, or, for an unreadable image,
a counted and logged skip naming the file (configurable to fail)."""

import io
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hjepa.data.decode import UnreadableImageError, decode_image
from hjepa.data.folder import ImageFolder
from hjepa.data.imagenet import ImageNet
from hjepa.data.mixture import Mixture, normalize_weights
from hjepa.data.synthetic import SyntheticShapes
from hjepa.data.torchvision_sets import CIFAR10, CIFAR100, NETWORK_TIMEOUT_S, STL10
from hjepa.data.transforms import eval_transform, train_transform
from hjepa.errors import ConfigError, DataError

WNID = "n01440764"


@pytest.fixture
def real_jpeg(imagenet_samples):
    return imagenet_samples / f"{WNID}_tench.JPEG"


@pytest.fixture
def odd_files(real_jpeg, tmp_path):
    """One class folder with three unreadable files and three odd but valid ones."""
    folder = tmp_path / "odd" / WNID
    folder.mkdir(parents=True)
    data = real_jpeg.read_bytes()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    (folder / "a_good.JPEG").write_bytes(data)
    (folder / "b_truncated.JPEG").write_bytes(data[: len(data) // 2])
    (folder / "c_empty.JPEG").write_bytes(b"")
    (folder / "d_text.JPEG").write_text("this is not an image\n")
    image.save(folder / "e_png.JPEG", format="PNG")
    image.convert("L").save(folder / "f_gray.jpg")
    image.convert("CMYK").save(folder / "g_cmyk.jpeg")
    return folder, image


# ---- unreadable and unusual image files ----------------------------------------------------

def test_decode_unusual_but_valid_images(odd_files):
    folder, image = odd_files
    reference = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    for name in ("e_png.JPEG", "f_gray.jpg", "g_cmyk.jpeg"):
        decoded = decode_image(folder / name)
        assert decoded.dtype == torch.uint8 and decoded.shape == reference.shape
    assert torch.equal(decode_image(folder / "e_png.JPEG"), reference)  # a PNG named .JPEG: lossless
    gray = decode_image(folder / "f_gray.jpg")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    cmyk = decode_image(folder / "g_cmyk.jpeg").float()
    assert (cmyk - reference.float()).abs().mean() < 12  # JPEG-compressed, but the same colours


@pytest.mark.parametrize("name,reason", [
    ("b_truncated.JPEG", "truncated"),
    ("c_empty.JPEG", "empty file"),
    ("d_text.JPEG", "not a decodable image"),
])
def test_decode_unreadable_names_the_file(odd_files, name, reason):
    folder, _ = odd_files
    with pytest.raises(UnreadableImageError, match=reason) as e:
        decode_image(folder / name)
    assert str(folder / name) in str(e.value)


def test_unreadable_images_are_skipped_counted_and_logged(odd_files, caplog):
    folder, _ = odd_files
    ds = ImageFolder(str(folder.parent), "train")
    assert len(ds) == 7
    with caplog.at_level(logging.WARNING, logger="hjepa.data.folder"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 3 + 2 + 1  # b, c, d replaced by the next readable item (skipping on)
    for name in ("b_truncated", "c_empty", "d_text"):
        assert any(name in r.getMessage() for r in caplog.records)
    assert all(image.dtype == torch.uint8 and image.shape[0] == 3 for image, _ in items)
    assert torch.equal(items[1][0], items[4][0])  # deterministic substitute: the next readable one


def test_unreadable_image_can_be_made_to_fail(odd_files):
    folder, _ = odd_files
    ds = ImageFolder(str(folder.parent), "train", on_error="raise")
    ds[0]
    with pytest.raises(DataError, match="b_truncated.JPEG"):
        ds[1]


# ---- a tree of pathological files (tests/conftest.py: make_bad_tree) ------------------------

MAX_PIXELS = 4_000_000  # the tree's huge.png has 6 megapixels


def test_every_file_of_a_bad_tree_decodes_to_rgb_uint8_or_names_its_problem(make_bad_tree, tmp_path):
    cases = make_bad_tree(tmp_path)
    for path, reason in cases.items():
        if reason is None:
            image = decode_image(path, max_pixels=MAX_PIXELS)
            assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3, path.name
        else:
            with pytest.raises(UnreadableImageError, match=reason) as e:
                decode_image(path, max_pixels=MAX_PIXELS)
            assert str(path) in str(e.value)
    sixteen = decode_image(tmp_path / "mixed" / "sixteen_bit.png")
    gray = decode_image(tmp_path / "mixed" / "gray.jpg")
    assert (sixteen.float() - gray.float()).abs().mean() < 3  # 16 bits -> their high byte, not noise


@pytest.mark.parametrize("transform", ["train", "eval"])  # crop fused into the decode / full decode
def test_training_reads_a_bad_tree_skipping_and_naming_every_bad_file(make_bad_tree, tmp_path, caplog, transform):
    cases = make_bad_tree(tmp_path)
    tf = train_transform(32, [0.3, 1.0], [0.75, 1.333], 0.5, 0.1) if transform == "train" else eval_transform(32)
    with caplog.at_level(logging.WARNING, logger="hjepa.data.folder"):
        ds = ImageFolder(str(tmp_path), "train", transform=tf, max_pixels=MAX_PIXELS)
        items = [ds[i] for i in range(len(ds))]
    bad = [p for p, reason in cases.items() if reason]
    assert len(items) == len(ds) == len(cases)  # the broken symbolic link is not an item
    assert all(image.dtype == torch.uint8 and image.shape == (3, 32, 32) for image, _ in items)
    # An unreadable item is replaced by the next readable one: a skip per bad file passed over.
    unreadable = [cases[Path(path)] is not None for path, _ in ds.samples]
    passes = sum(next(k for k in range(len(ds)) if not unreadable[(i + k) % len(ds)]) for i in range(len(ds)))
    assert ds.num_skipped == passes + 1  # and the broken link, once
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for path in [*bad, tmp_path / "mixed" / "broken_link.jpg"]:
        assert str(path) in logged
    assert "broken symbolic link" in logged

    strict = ImageFolder(str(tmp_path), "train", transform=tf, on_error="raise", max_pixels=MAX_PIXELS)
    for i, (path, _) in enumerate(strict.samples):
        if cases[Path(path)] is None:
            strict[i]
        else:
            with pytest.raises(DataError, match=cases[Path(path)]) as e:
                strict[i]
            assert path in str(e.value)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 megapixels in 24 kB: 588 MB as RGB
    with pytest.raises(UnreadableImageError, match=r"14000x14000 = 196\.0 megapixels, more than dataset\.max_pixels"):
        decode_image(bomb)
    with pytest.raises(ConfigError, match="dataset.max_pixels: expected a positive int"):
        ImageFolder(str(tmp_path), "train", max_pixels=0)


def test_listing_names_loops_and_unreadable_folders(make_bad_tree, tmp_path, monkeypatch):
    root = tmp_path / "tree"
    make_bad_tree(root)
    os.symlink(root / "loop", root / "loop")  # a class entry that is a symbolic link loop
    with pytest.raises(DataError, match=f"{root / 'loop'}: Too many levels of symbolic links"):
        ImageFolder(str(root), "train")
    os.unlink(root / "loop")

    scandir = os.scandir
    def refuse(path):  # root reads every folder: simulate one it may not list
        if str(path).endswith("odd_but_fine"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(DataError, match=f"cannot list {root / 'odd_but_fine'}: Permission denied"):
        ImageFolder(str(root), "train")


def test_every_empty_class_is_named_at_once(real_jpeg, tmp_path):
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(real_jpeg.read_bytes())
    with pytest.raises(DataError, match=r"3 of the 4 class folders in .* contain no images: a, c, d"):
        ImageFolder(str(tmp_path), "train")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_skips_in_loader_workers_are_counted(odd_files, context):
    folder, _ = odd_files
    ds = ImageFolder(str(folder.parent), "train")
    mix = Mixture({"odd": ds, "shapes": SyntheticShapes("val", num_val=5)})
    loader = DataLoader(mix, batch_size=None, num_workers=1, multiprocessing_context=context)
    assert len(list(loader)) == 12
    assert ds.num_skipped == mix.num_skipped == 6


# ---- folder layouts ------------------------------------------------------------------------

def test_missing_roots(tmp_path):
    with pytest.raises(DataError, match=f"image folder root {tmp_path / 'nope'} does not exist"):
        ImageFolder(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match=r"ImageNet root .*nope does not exist.*image-net\.org.*<root>/train/<wnid>"):
        ImageNet(str(tmp_path / "nope"), "train")
    (tmp_path / "train" / WNID).mkdir(parents=True)
    with pytest.raises(DataError, match=r"ImageNet val folder .*val does not exist"):
        ImageNet(str(tmp_path), "val")


def test_flat_imagenet_val(real_jpeg, tmp_path):
    (tmp_path / "train" / WNID).mkdir(parents=True)
    os.symlink(real_jpeg, tmp_path / "train" / WNID / real_jpeg.name)
    (tmp_path / "val").mkdir()
    for i in range(3):
        os.symlink(real_jpeg, tmp_path / "val" / f"ILSVRC2012_val_0000000{i}.JPEG")
    with pytest.raises(DataError, match=r"ImageNet val must be in class folders <root>/val/<wnid>/\*\.JPEG.*valprep\.sh"):
        ImageNet(str(tmp_path), "val")
    with pytest.raises(DataError, match="valprep.sh"):
        ImageNet(str(tmp_path), "val", subset="imagenet100")


def test_imagenet_subset_classes_missing(imagenet_samples, tmp_path):
    robin = "n01558993"  # the first ImageNet-100 class
    (tmp_path / "train" / robin).mkdir(parents=True)
    os.symlink(imagenet_samples / f"{robin}_robin.JPEG", tmp_path / "train" / robin / "robin.JPEG")
    with pytest.raises(DataError, match=r"99 of the 100 ImageNet-100 classes have no folder in .*train: "
                                        r"n01692333, n0\d+, n0\d+, n0\d+, n0\d+ and 94 more"):
        ImageNet(str(tmp_path), "train", subset="imagenet100")
    with pytest.raises(ConfigError, match="subset: expected 'imagenet100' or a file of wnids"):
        ImageNet(str(tmp_path), "train", subset="imagenet1OO")


def test_empty_class_folder(real_jpeg, tmp_path):
    for wnid in (WNID, "n01443537"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    os.symlink(real_jpeg, tmp_path / "train" / WNID / real_jpeg.name)
    (tmp_path / "train" / "n01443537" / "notes.txt").write_text("no images here")
    for build in (lambda: ImageNet(str(tmp_path), "train"), lambda: ImageFolder(str(tmp_path / "train"), "train")):
        with pytest.raises(DataError, match=r"1 of the 2 class folders in .*train contain no images: n01443537"):
            build()


def test_image_folder_bad_splits(real_jpeg, tmp_path):
    (tmp_path / "cls").mkdir()
    os.symlink(real_jpeg, tmp_path / "cls" / "x.jpg")
    with pytest.raises(ConfigError, match="has no val split: set val_root or holdout"):
        ImageFolder(str(tmp_path), "val")
    with pytest.raises(DataError, match="has 1 images: cannot hold out 1"):
        ImageFolder(str(tmp_path), "train", holdout=1)
    with pytest.raises(ConfigError, match="val_root or holdout, not both"):
        ImageFolder(str(tmp_path), "train", val_root=str(tmp_path), holdout=1)
    with pytest.raises(DataError, match="has no class folders"):
        ImageFolder(str(tmp_path / "cls"), "train")


# ---- mixture weights -----------------------------------------------------------------------

@pytest.mark.parametrize("weights,message", [
    ({"a": -0.5, "b": 1.0}, r"mixture\.components\.a\.weight: expected a finite number >= 0, got -0\.5"),
    ({"a": 0, "b": 0.0}, "mixture weights are all zero"),
    ({"a": float("nan"), "b": 1.0}, r"mixture\.components\.a\.weight: expected a finite number"),
    ({"a": 1.0, "b": 1.0, "imagenet1k": 1.0}, r"unknown component\(s\) imagenet1k"),
    ({"a": 1.0}, "no weight for b"),
])
def test_bad_mixture_weights(weights, message):
    datasets = {"a": SyntheticShapes("val", num_val=10), "b": SyntheticShapes("val", num_val=20)}
    with pytest.raises(ConfigError, match=message):
        Mixture(datasets, weights)
    if set(weights) == {"a", "b"}:
        with pytest.raises(ConfigError, match=message):
            normalize_weights(weights)


# ---- CIFAR / STL-10 absent -----------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """A machine without network: every connection attempt fails at once; returns the attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append((args, kwargs))
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("cls,split,files,url", [
    (CIFAR10, "train", r"data_batch_1, .*batches\.meta in .*cifar-10-batches-py", "cifar-10-python.tar.gz"),
    (CIFAR100, "test", r"test, meta in .*cifar-100-python", "cifar-100-python.tar.gz"),
    (STL10, "train+unlabeled", r"train_X\.bin, train_y\.bin, unlabeled_X\.bin, class_names\.txt in .*stl10_binary",
     "stl10_binary.tar.gz"),
])
def test_torchvision_sets_absent(cls, split, files, url, tmp_path, offline):
    with pytest.raises(DataError, match=f"not found: expected {files}.*{url}.*download: true"):
        cls(str(tmp_path), split, download=False)
    assert offline == []  # download=False never touches the network
    with pytest.raises(DataError, match=f"{files}.*{url}.*cannot reach .*Network is unreachable"):
        cls(str(tmp_path), split, download=True)
    # one short probe of the server, never a download that could hang for minutes
    (address, timeout), = [args for args, _ in offline]
    assert address[1] in (80, 443) and timeout == NETWORK_TIMEOUT_S
    assert not any(tmp_path.iterdir())  # nothing half-written left behind


def test_torchvision_set_partly_present(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80garbage")
    with pytest.raises(DataError, match=r"\(data_batch_2, .* missing\)"):
        CIFAR10(str(tmp_path), "train", download=False)
    for f in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "batches.meta"):
        (tmp_path / "cifar-10-batches-py" / f).write_bytes(b"")
    with pytest.raises(DataError, match=r"data_batch_1: not a readable CIFAR-10 batch .*download again"):
        CIFAR10(str(tmp_path), "train", download=False)
