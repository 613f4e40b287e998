"""CIFAR-10, CIFAR-100 and STL-10 as uint8 [3, H, W] tensors.

torchvision downloads and checksums the archives (download=True); the files are read here,
in torchvision's on-disk layout, because torchvision's classes re-hash every file on each
construction (seconds for STL-10's 2.6 GB) and load STL-10's 100k unlabeled images into
memory, where a memory map costs nothing and is shared by all loader workers.
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Callable, Literal, Optional
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision.datasets as tvd
from torch.utils.data import Dataset
from torchvision.datasets.utils import download_and_extract_archive

from hjepa.data.cache import DecodedImages, ImageCache, check_cache_mode
from hjepa.errors import ConfigError, DataError, MissingDataError

NETWORK_TIMEOUT_S = 5.0


def fetch(root: str, tv_class: type, name: str, files: list[str], download: bool) -> Path:
    """The folder holding `files` under `root`, downloaded by torchvision when absent and allowed."""
    base = Path(root).expanduser() / tv_class.base_folder
    if all((base / f).is_file() for f in files):
        return base
    missing = [f for f in files if not (base / f).is_file()]
    partly = f" ({', '.join(missing)} missing)" if len(missing) < len(files) else ""
    manual = (
        f"{name} not found: expected {', '.join(files)} in {base}{partly}. "
        f"Get {tv_class.url} and extract it into {Path(root).expanduser()}"
    )
    if not download:
        raise MissingDataError(f"{manual}, or set download: true to let torchvision fetch it.")
    # Probe the server with a short timeout first: on a machine without network a plain
    # download can hang for minutes before failing.
    url = urlparse(tv_class.url)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), NETWORK_TIMEOUT_S).close()
    except OSError as e:
        raise MissingDataError(f"{manual}. Downloading it failed: cannot reach {url.hostname} ({e}).") from None
    try:
        download_and_extract_archive(tv_class.url, str(base.parent), filename=tv_class.filename, md5=tv_class.tgz_md5)
    except Exception as e:  # urllib, http.client, tarfile and checksum errors alike
        raise MissingDataError(f"{manual}. Downloading it failed: {e}") from None
    if not all((base / f).is_file() for f in files):
        raise MissingDataError(f"{manual}. The downloaded archive did not contain them.")
    return base


class _TensorImages(Dataset):
    """Shared by the three: (image, label) with image uint8 [3, H, W] after the transform."""

    labeled_split = "train"
    eval_split = "test"
    classes: list[str]
    targets: list[int]
    transform: Optional[Callable]
    cache: Optional[ImageCache] = None  # decoded images augmented on the device (CIFAR's `cache`)
    gpu_augment = None
    on_error = "raise"  # every image is already in memory: nothing to skip
    num_skipped = 0

    def _image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = range(len(self))[index]  # IndexError when out of range, as a Sequence
        if self.cache is not None:
            return self.cache.item(index, self.transform), self.targets[index]
        image = self._image(index)
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


class CIFAR10(_TensorImages):
    """CIFAR-10 (python version): 50k train / 10k test images, 32 px, 10 classes.

    `cache`: "memory" | "device" augment on the device in batches, as ImageFolder's cache
    (hjepa.data.cache; "device" keeps the 150 MB of pixels on the GPU); the images are
    already one uint8 tensor here, so nothing is decoded or copied.
    """

    _tv = tvd.CIFAR10
    _name = "CIFAR-10"
    _label_key = "labels"

    def __init__(
        self,
        root: str,
        split: Literal["train", "test"],
        transform: Optional[Callable] = None,
        download: bool = True,
        cache: Literal["none", "memory", "device"] = "none",
    ):
        if split not in ("train", "test"):
            raise ConfigError(f"split: expected 'train' or 'test' for {self._name}, got {split!r}")
        check_cache_mode(cache)
        batches = [f for f, _md5 in (self._tv.train_list if split == "train" else self._tv.test_list)]
        meta = self._tv.meta
        base = fetch(root, self._tv, self._name, batches + [meta["filename"]], download)
        data, targets = [], []
        for f in batches:
            batch = _unpickle(base / f, self._name)
            data.append(batch["data"])
            targets += batch[self._label_key]
        # Stored as rows of 3072 bytes, channel-major: a free view as [N, 3, 32, 32].
        self.images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32)
        self.targets = [int(t) for t in targets]
        self.classes = list(_unpickle(base / meta["filename"], self._name)[meta["key"]])
        self.transform = transform
        if cache != "none":
            sizes = torch.full((len(self.images), 2), 32, dtype=torch.long)
            self.cache = ImageCache(cache, DecodedImages(self.images, sizes), transform)

    def _image(self, index: int) -> torch.Tensor:
        # A copy: a view would drag the whole 150 MB storage along when sent between processes.
        return self.images[index].clone()


class CIFAR100(CIFAR10):
    """CIFAR-100 (python version): 50k train / 10k test images, 32 px, 100 fine classes."""

    _tv = tvd.CIFAR100
    _name = "CIFAR-100"
    _label_key = "fine_labels"


class STL10(_TensorImages):
    """STL-10 binary version, 96 px: 5k labeled train, 8k test, 100k unlabeled (label -1)."""

    _parts = {
        "train": [("train_X.bin", "train_y.bin")],
        "test": [("test_X.bin", "test_y.bin")],
        "unlabeled": [("unlabeled_X.bin", None)],
        "train+unlabeled": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)],
    }
    _image_bytes = 3 * 96 * 96

    def __init__(
        self,
        root: str,
        split: Literal["train", "test", "unlabeled", "train+unlabeled"],
        transform: Optional[Callable] = None,
        download: bool = True,
    ):
        if split not in self._parts:
            raise ConfigError(f"split: expected one of {', '.join(self._parts)} for STL-10, got {split!r}")
        parts = self._parts[split]
        files = [f for part in parts for f in part if f] + [tvd.STL10.class_names_file]
        base = fetch(root, tvd.STL10, "STL-10", files, download)
        self._paths, self.targets, counts = [], [], []
        for x_file, y_file in parts:
            size = (base / x_file).stat().st_size
            if size == 0 or size % self._image_bytes:
                raise DataError(f"{base / x_file}: {size} bytes is not a whole number of 96x96 RGB images; re-download it")
            count = size // self._image_bytes
            if y_file is None:
                labels = [-1] * count
            else:
                labels = (np.fromfile(base / y_file, dtype=np.uint8).astype(np.int64) - 1).tolist()  # stored 1..10
                if len(labels) != count:
                    raise DataError(f"{base / y_file} has {len(labels)} labels for {count} images in {x_file}")
            self._paths.append(str(base / x_file))
            self.targets += labels
            counts.append(count)
        self._starts = np.cumsum([0] + counts[:-1])  # first index of each part
        self.classes = (base / tvd.STL10.class_names_file).read_text().split()
        self.transform = transform
        self._maps: Optional[list[np.ndarray]] = None

    def _image(self, index: int) -> torch.Tensor:
        if self._maps is None:  # opened lazily, in each worker: a memory map must not be pickled
            self._maps = [np.memmap(p, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96) for p in self._paths]
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        # Each channel is stored column-major: transpose to rows first.
        return torch.from_numpy(np.ascontiguousarray(self._maps[part][index - self._starts[part]].transpose(0, 2, 1)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}


def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable {name} batch ({e}); delete it and download again") from None
