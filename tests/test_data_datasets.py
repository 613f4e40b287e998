"""Datasets on real images: CIFAR-10 JPEGs as an image folder, an ImageNet tree built from the
1,000 ImageNet samples (ImageNet-100 filtering), the synthetic shapes, and the CIFAR/STL
readers on files written in their on-disk formats from real CIFAR images."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hjepa.data.folder import ImageFolder
from hjepa.data.imagenet import IMAGENET100_FILE, ImageNet, read_wnids
from hjepa.data.decode import decode_image
from hjepa.data.synthetic import CLASSES, SyntheticShapes
from hjepa.data.torchvision_sets import CIFAR10, CIFAR100, STL10

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---- synthetic -----------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_labeled():
    ds = SyntheticShapes("train", num_train=1000, num_val=200)
    image, label = ds[13]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label == 13 % len(CLASSES) == ds.targets[13]
    assert torch.equal(SyntheticShapes("train", num_train=1000)[13][0], image)  # same (seed, split, index)
    assert not torch.equal(SyntheticShapes("train", seed=1)[13][0], image)
    assert not torch.equal(SyntheticShapes("val", num_val=200)[13][0], image)  # disjoint streams
    assert len(ds) == 1000 and len(SyntheticShapes("val", num_val=200)) == 200
    assert ds.classes == CLASSES and len(set(ds.targets)) == 10
    assert (ds.labeled_split, ds.eval_split) == ("train", "val")
    assert SyntheticShapes("train", image_size=64)[0][0].shape == (3, 64, 64)
    with pytest.raises(IndexError):
        ds[1000]


def test_synthetic_nuisances_vary_within_a_class():
    ds = SyntheticShapes("train")
    same_class = torch.stack([ds[i][0] for i in range(0, 400, 10)]).float().mean(dim=1)  # all label 0, grey
    shape = same_class > 128  # the light shape on the dark ground
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = shape.float().sum(dim=(1, 2))
    centre_x = (shape * xs).sum(dim=(1, 2)) / area
    centre_y = (shape * ys).sum(dim=(1, 2)) / area
    # Position and scale are random within a class; the grey levels are nearly constant.
    assert centre_x.std() > 2 and centre_y.std() > 2
    assert area.std() > 0.2 * area.mean()
    assert (same_class * shape).sum(dim=(1, 2)).div(area).std() < 20


# ---- image folder (CIFAR-10 JPEGs) -------------------------------------------------------

def test_cifar10_jpegs_load_as_image_folder_with_a_seeded_holdout(cifar10_train):
    train = ImageFolder(str(cifar10_train), "train", holdout=500)
    val = ImageFolder(str(cifar10_train), "val", holdout=500)
    assert train.classes == val.classes == CIFAR_CLASSES
    assert len(train) == 45000 and len(val) == 5000
    assert np.bincount(val.targets).tolist() == [500] * 10
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert (train.labeled_split, train.eval_split) == ("train", "val")
    for i in (0, 22222, 44999):
        image, label = train[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert Path(train.samples[i][0]).parent.name == CIFAR_CLASSES[label]
    # The holdout is a pure function of the seed; a fraction works like a count.
    assert ImageFolder(str(cifar10_train), "val", holdout=0.1).samples == val.samples
    assert ImageFolder(str(cifar10_train), "val", holdout=500, seed=1).samples != val.samples
    assert ImageFolder(str(cifar10_train), "train").eval_split is None


def test_image_folder_val_root(cifar10_train, tmp_path):
    for split, first in (("train", 0), ("val", 100)):
        for name in CIFAR_CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            for f in sorted(os.listdir(cifar10_train / name))[first:first + 3]:
                os.symlink(cifar10_train / name / f, tmp_path / split / name / f.upper())  # .JPG: any case
    val = ImageFolder(str(tmp_path / "train"), "val", val_root=str(tmp_path / "val"))
    assert len(val) == 30 and val.eval_split == "val" and val.targets[:3] == [0, 0, 0]
    assert all(p.startswith(str(tmp_path / "val")) for p, _ in val.samples)
    assert val[29][0].shape == (3, 32, 32)


# ---- ImageNet / ImageNet-100 ----------------------------------------------------------------

def test_shipped_imagenet100_list_is_the_cmc_list(imagenet100_wnids_file):
    assert IMAGENET100_FILE.read_text() == imagenet100_wnids_file.read_text()
    wnids, name = read_wnids("imagenet100")
    assert len(wnids) == 100 and wnids == sorted(wnids) and name == "ImageNet-100"


def test_imagenet100_from_real_samples(imagenet_samples, imagenet100_wnids_file, tmp_path, imagenet_tree):
    root = imagenet_tree(tmp_path)
    expected = imagenet100_wnids_file.read_text().split()
    for split in ("train", "val"):
        ds = ImageNet(str(root), split, subset="imagenet100")
        assert ds.classes == sorted(expected)
        assert ds.targets == list(range(100))  # one image per class, labels 0..99 in sorted wnid order
        assert all(Path(p).name.startswith(ds.classes[label]) for p, label in ds.samples)
        assert (ds.labeled_split, ds.eval_split) == ("train", "val")
    for i in range(100):  # real JPEGs of all sizes, grayscale among them: all uint8 RGB
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and label == i
    assert len(ImageNet(str(root), "train").classes) == 1000


def test_imagenet_subset_lists_only_its_own_folders(imagenet_samples, imagenet100_wnids_file, tmp_path, imagenet_tree):
    root = imagenet_tree(tmp_path, splits=("train",))
    subset = set(imagenet100_wnids_file.read_text().split())
    others = sorted(w for w in os.listdir(root / "train") if w not in subset)
    # Break two classes outside the subset: listing them would fail.
    for f in os.listdir(root / "train" / others[0]):
        os.remove(root / "train" / others[0] / f)
    os.rename(root / "train" / others[1], root / "train" / (others[1] + ".bak"))
    (root / "train" / others[1]).write_text("not a folder")
    assert len(ImageNet(str(root), "train", subset="imagenet100")) == 100
    wnid_file = tmp_path / "my_subset.txt"
    wnid_file.write_text(f"# three classes\n{others[5]}\n{others[3]}\n\n{others[4]}  # trailing comment\n")
    custom = ImageNet(str(root), "train", subset=str(wnid_file))
    assert custom.classes == sorted([others[3], others[4], others[5]]) and custom.targets == [0, 1, 2]


# ---- CIFAR / STL readers on their on-disk formats ------------------------------------------

def _cifar_images(cifar10_train, n_per_class=2):
    images, labels = [], []
    for label, name in enumerate(CIFAR_CLASSES):
        for f in sorted(os.listdir(cifar10_train / name))[:n_per_class]:
            images.append(decode_image(cifar10_train / name / f))
            labels.append(label)
    return torch.stack(images), labels


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_cifar_readers(cifar10_train, tmp_path):
    images, labels = _cifar_images(cifar10_train)
    rows = images.reshape(len(images), -1).numpy()  # CIFAR stores channel-major rows of 3072 bytes
    base = tmp_path / "c10" / "cifar-10-batches-py"
    for i in range(1, 6):
        _pickle(base / f"data_batch_{i}", {"data": rows[4 * i - 4:4 * i], "labels": labels[4 * i - 4:4 * i]})
    _pickle(base / "test_batch", {"data": rows[:4], "labels": labels[:4]})
    _pickle(base / "batches.meta", {"label_names": CIFAR_CLASSES})
    train = CIFAR10(str(tmp_path / "c10"), "train", download=False)
    assert len(train) == 20 and train.classes == CIFAR_CLASSES
    assert (train.labeled_split, train.eval_split) == ("train", "test")
    assert torch.equal(train[0][0], images[0]) and train[0][1] == labels[0]
    assert torch.equal(train[19][0], images[19]) and train.targets == labels
    assert train[0][0].dtype == torch.uint8 and len(CIFAR10(str(tmp_path / "c10"), "test", download=False)) == 4

    base = tmp_path / "c100" / "cifar-100-python"
    _pickle(base / "train", {"data": rows, "fine_labels": labels, "coarse_labels": labels})
    _pickle(base / "test", {"data": rows[:3], "fine_labels": labels[:3], "coarse_labels": labels[:3]})
    _pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    c100 = CIFAR100(str(tmp_path / "c100"), "train", download=False)
    assert len(c100) == 20 and len(c100.classes) == 100 and torch.equal(c100[19][0], images[19])


def test_stl10_reader(cifar10_train, tmp_path):
    images = torch.nn.functional.interpolate(_cifar_images(cifar10_train)[0].float(), size=96).to(torch.uint8)
    base = tmp_path / "stl10_binary"
    base.mkdir()
    # STL-10 stores each channel column-major.
    (base / "train_X.bin").write_bytes(images[:6].transpose(2, 3).contiguous().numpy().tobytes())
    (base / "train_y.bin").write_bytes(bytes([1, 2, 3, 4, 5, 10]))  # 1-based on disk
    (base / "unlabeled_X.bin").write_bytes(images[6:].transpose(2, 3).contiguous().numpy().tobytes())
    (base / "test_X.bin").write_bytes(images[:2].transpose(2, 3).contiguous().numpy().tobytes())
    (base / "test_y.bin").write_bytes(bytes([7, 8]))
    (base / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    ds = STL10(str(tmp_path), "train+unlabeled", download=False)
    assert len(ds) == 20 and ds.targets == [0, 1, 2, 3, 4, 9] + [-1] * 14
    assert torch.equal(ds[3][0], images[3]) and torch.equal(ds[10][0], images[10]) and ds[10][1] == -1
    assert (ds.labeled_split, ds.eval_split) == ("train", "test") and len(ds.classes) == 10
    clone = pickle.loads(pickle.dumps(ds))  # as sent to loader workers: the memory maps are reopened
    assert torch.equal(clone[19][0], images[19])
    assert STL10(str(tmp_path), "test", download=False).targets == [6, 7]
    assert len(STL10(str(tmp_path), "unlabeled", download=False)) == 14
